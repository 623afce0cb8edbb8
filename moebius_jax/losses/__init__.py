"""Training losses.

E-LatentLPIPS: `metric = load_elatentlpips(weights_dir)`, then, inside a jitted step,
`elatentlpips_distance(metric, x0, x1, key=key)` -> (B,) for NHWC SDXL-VAE latents.
"""

from moebius_jax.losses.elatentlpips import ELatentLPIPS, elatentlpips_distance, elatentlpips_terms
from moebius_jax.losses.elatentlpips_weights import load_elatentlpips

__all__ = ["ELatentLPIPS", "elatentlpips_distance", "elatentlpips_terms", "load_elatentlpips"]
