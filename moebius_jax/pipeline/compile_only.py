"""`infer.py --compile-only`: the sampler's program compiled for a target, no weights needed.

The program is the one `InpaintPipeline` runs (`Sampler`: two VAE encodes, the DDIM + CFG
loop, the decode) at a resolution, batch and compute dtype, with the batch spread over every
device of the target as the sampler spreads it over a host's devices and the weights
replicated, as loaded (float32; the program casts them to the compute dtype once per call).
Everything is abstract, so a TPU topology compiles on any host with libtpu (the `tpu` extra).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from moebius_jax import aot
from moebius_jax.config import ModelConfig, default_model_config, load_config
from moebius_jax.dtypes import DTYPES
from moebius_jax.loading import abstract_variables, build_model
from moebius_jax.models.vae import AutoencoderKL
from moebius_jax.pipeline.sampler import Sampler, SamplerNoise, SamplerSettings, local_mesh
from moebius_jax.vae_loading import abstract_vae_variables, vae_structure


def compile_sampler(target: str, *, config: str | os.PathLike | ModelConfig | None = None,
                    vae: str | os.PathLike | None = None, resolution: int | None = None, batch_size: int = 1,
                    dtype: str = "float32", steps: int = 20) -> tuple[aot.CompileReport, jax.stages.Compiled]:
    """The sampler program for `batch_size` images of `resolution`² (default: the model's
    image size) compiled for every device of `target`, and its report. `config`: the model
    YAML (default `configs/moebius.yaml`); `vae`: a local VAE folder whose config.json gives
    its structure (default the SD VAE's, see `vae_structure`)."""
    devices = aot.target_devices(target)
    cfg = load_config(default_model_config() if config is None else config)
    model, _ = build_model(cfg, DTYPES[dtype])
    vae_module = AutoencoderKL(vae_structure(vae), dtype=DTYPES[dtype])
    mesh = local_mesh(devices)
    sampler = Sampler(model, vae_module, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    spread = NamedSharding(mesh, PartitionSpec("batch"))

    side = resolution or cfg.image_size
    factor = vae_module.config.downsample_factor
    latent = (side // factor, side // factor)
    rows = -(-batch_size // mesh.size) * mesh.size  # the sampler pads a batch to a multiple of the devices
    noise = jax.eval_shape(lambda key: SamplerNoise.draw(key, rows, latent, vae_module.config.latent_channels),
                           jax.random.key(0))
    image = jax.ShapeDtypeStruct((rows, side, side, 3), jnp.float32)
    data = (image, image, jax.ShapeDtypeStruct((rows, *latent, 1), jnp.float32), noise)
    scalars = (jax.ShapeDtypeStruct((), jnp.float32),) * 2 + (jax.ShapeDtypeStruct((), jnp.int32),)
    weights = (abstract_variables(model, cfg), abstract_vae_variables(vae_module))
    args = (*aot.abstract(weights, replicated), *aot.abstract(data, spread), *aot.abstract(scalars, replicated))
    name = f"sampler ({steps} steps, {batch_size} image(s) of {side}², {dtype})"
    aot.check_arguments_fit(args, name=name, target=target)
    return aot.compile_traced(sampler.trace(*args, settings=SamplerSettings(num_steps=steps)), name=name,
                              target=target)


def run_compile_only(topology: str, **settings: Any) -> int:
    """Print the sampler's report for `topology` (`compile_sampler`'s settings); 0 when it
    fits, a one-line `DoesNotFit` error (exit status 1 at the command line) when it does not."""
    report, _ = compile_sampler(aot.topology_target(topology), **settings)
    print(report.summary(), flush=True)
    report.check_fits()
    return 0
