"""moebius-jax: the Moebius inpainting model (and its PixelHacker teacher) in JAX/Flax.

Public API:
    load_model(config, weights=None) -> (model, variables)
    load_teacher(config, weights=None) -> (model, variables)
    load_vae(path) -> (vae, variables)
"""

from moebius_jax.loading import load_model, load_teacher
from moebius_jax.vae_loading import load_vae

__all__ = ["load_model", "load_teacher", "load_vae"]
