"""moebius-jax: the Moebius inpainting model (and its PixelHacker teacher) in JAX/Flax.

Public API (imported lazily, so `import moebius_jax` stays cheap, e.g. in data workers):
    load_model(config, weights=None) -> (model, variables)
    load_teacher(config, weights=None) -> (model, variables)
    load_vae(path) -> (vae, variables)
    load_elatentlpips(trunk_or_dir, heads=None) -> ELatentLPIPS
    InpaintPipeline.from_pretrained(weights=None, vae=None, config=None, dtype="float32")  (None: from the Hub)
"""

import importlib

_EXPORTS = {
    "load_model": "moebius_jax.loading",
    "load_teacher": "moebius_jax.loading",
    "load_vae": "moebius_jax.vae_loading",
    "load_elatentlpips": "moebius_jax.losses",
    "InpaintPipeline": "moebius_jax.pipeline.inpaint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moebius_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
