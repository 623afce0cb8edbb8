"""Subprocess helper for test_sharding (the host device count must be set before JAX starts).

The tiny sampler (3 DDIM steps) spread over all 8 devices, on a batch of eight and on its first
three (padded to eight rows), and those three on one device. Prints one JSON line.
"""

import json
import pathlib
import sys

import jax
import numpy as np
from jax.sharding import AxisType

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebius_jax.loading import load_model  # noqa: E402
from moebius_jax.pipeline.sampler import Sampler, SamplerNoise, SamplerSettings  # noqa: E402
from moebius_jax.vae_loading import load_vae  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
model, unet_variables = load_model(FIXTURES / "moebius_tiny" / "config.yaml",
                                   FIXTURES / "moebius_tiny" / "diffusion_pytorch_model.bin")
vae, vae_variables = load_vae(FIXTURES / "vae_tiny")
rng = np.random.default_rng(0)
image = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
mask = (rng.uniform(size=(8, 4, 4, 1)) < 0.5).astype(np.float32)
masked = image * (1 - np.repeat(np.repeat(mask, 8, axis=1), 8, axis=2))
noise = SamplerNoise.draw(jax.random.key(0), 8, (4, 4))
first3 = (image[:3], masked[:3], mask[:3], jax.tree.map(lambda x: x[:3], noise))
settings = SamplerSettings(num_steps=3)


def sampler_on(devices):
    sampler = Sampler(model, vae, jax.make_mesh((len(devices),), ("batch",), (AxisType.Auto,), devices=devices))
    return sampler, sampler.place(unet_variables), sampler.place(vae_variables)


spread, unet_spread, vae_spread = sampler_on(jax.devices())
out8 = spread(unet_spread, vae_spread, image, masked, mask, noise, settings=settings)
compiled = spread.compile_seconds
out3 = spread(unet_spread, vae_spread, *first3, settings=settings)  # padded to 8 rows: the same program
single, unet_single, vae_single = sampler_on(jax.devices()[:1])
one = single(unet_single, vae_single, *first3, settings=settings)
print(json.dumps({
    "devices": jax.device_count(),
    "output_devices": len(out8.decoded.sharding.device_set),
    "recompiled": spread.compile_seconds != compiled,
    "shape": list(out3.decoded.shape),
    "padded_vs_full": float(np.max(np.abs(np.asarray(out3.decoded) - np.asarray(out8.decoded[:3])))),
    "max_diff": float(np.max(np.abs(np.asarray(out3.decoded) - np.asarray(one.decoded)))),
}))
