"""moebius-jax: the Moebius inpainting model (and its PixelHacker teacher) in JAX/Flax.

Public API:
    load_model(config, weights=None) -> (model, variables)
"""

from moebius_jax.loading import load_model

__all__ = ["load_model"]
