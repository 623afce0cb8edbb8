"""Inference benchmarks: student forward, VAE encode / decode / tiled decode, the whole sampler.

Weights are random (no files needed) and filled on the host: timings do not depend on the
values as long as they stay finite, and jitting the reference initialisers (`model.init`)
costs about a minute of compile per network on a 2-core CPU, more than the quick set's
whole budget. The sizes of each mode are the `Sizes` constants below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.harness import REPO, Case, Program
from moebius_jax.config import ModelConfig
from moebius_jax.latents import guidance_task_ids, latent_mask
from moebius_jax.loading import abstract_variables, build_model
from moebius_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL, VaeConfig, tile_starts
from moebius_jax.pipeline.sampler import ALWAYS_GUIDE, Sampler, SamplerNoise, SamplerSettings
from moebius_jax.schedulers import ddim_timesteps
from moebius_jax.vae_loading import abstract_vae_variables

# Students and (for the train step) teachers, by the names the results use.
MODEL_CONFIGS = {name: REPO / "configs" / f"{name}.yaml"
                 for name in ("moebius", "moebius_tiny", "pixelhacker", "pixelhacker_tiny")}
# The tiny VAE of the test fixtures (tests/fixtures/vae_tiny): same structure as SD's, narrow.
VAE_CONFIGS = {
    "sd_vae": SD_VAE_CONFIG,
    "vae_tiny": VaeConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2),
}
GUIDANCE_SCALE, NOISE_OFFSET = 2.5, 0.0357  # the pipeline's defaults
PIPELINE_STEPS = 20  # the reference's num_inference_steps (19 DDIM steps at strength 0.99)
# The student forward runs at the pipeline's first timestep (the value does not change the work).
CFG_TIMESTEP = int(ddim_timesteps(PIPELINE_STEPS, SamplerSettings().strength)[0])


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode measures: networks, image sides (pixels), tiling (latent pixels), batches."""

    student: str
    vae: str
    side: int  # student forward, encode, decode and the pipeline
    tiled_sides: tuple[int, ...]  # tiled decodes (each next to the untiled decode of that side)
    tile: int
    overlap: int
    pipeline_batches: tuple[int, ...]
    run_tiled_large: bool  # run the large tiled decodes, or only compile them (FLOPs, memory plan)
    run_untiled_large: bool  # same for the untiled decodes at the tiled sides
    budget_s: float  # timed-run budget of a case ...
    slow_budget_s: float  # ... and of the slow ones (tiled decode, pipeline)


QUICK = Sizes("moebius_tiny", "vae_tiny", side=128, tiled_sides=(512,), tile=16, overlap=4, pipeline_batches=(1, 8),
              run_tiled_large=True, run_untiled_large=True, budget_s=5.0, slow_budget_s=20.0)
FULL = Sizes("moebius", "sd_vae", side=512, tiled_sides=(1024, 2048), tile=64, overlap=16, pipeline_batches=(1, 8),
             run_tiled_large=True, run_untiled_large=True, budget_s=60.0, slow_budget_s=120.0)
# On a CPU a 512^2 SD decode takes about a minute, so the 1024^2 / 2048^2 tiled decodes (9 / 25
# such tiles) and batch 8 of the pipeline run only with --all; the untiled large decodes (up to
# a 65536-token attention, ~17 GB of scores) are only ever compiled there: their memory plans
# are what the comparison needs. One 512^2 pipeline run is minutes.
FULL_CPU = dataclasses.replace(FULL, pipeline_batches=(1,), run_tiled_large=False, run_untiled_large=False,
                               budget_s=120.0, slow_budget_s=600.0)
FULL_CPU_ALL = dataclasses.replace(FULL_CPU, pipeline_batches=(1, 8), run_tiled_large=True)


def random_variables(abstract: Any, seed: int = 0) -> Any:
    """Host stand-ins for trained weights, shaped like `abstract` (a pytree of ShapeDtypeStructs).

    Norm scales and BatchNorm variances are 1, biases, means and counts 0, everything else
    N(0, 1/fan_in) so activations keep unit scale through the network.
    """
    rng = np.random.default_rng(seed)

    def fill(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean", "count"):
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1]) or 1
        return (rng.standard_normal(leaf.shape, np.float32) / math.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def shapes(tree: Any) -> Any:
    """The abstract (shape, dtype) twin of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x)), tree)


@functools.cache
def model_abstract(config: str) -> tuple[ModelConfig, Any]:
    """Parsed config and abstract variables of a named model config (cheap: nothing allocated)."""
    model, cfg = build_model(MODEL_CONFIGS[config])
    return cfg, abstract_variables(model, cfg)


@functools.cache
def model_variables(config: str) -> Any:
    """Random host variables of a named model config, built once and shared by every case."""
    return random_variables(model_abstract(config)[1])


@functools.cache
def vae_abstract(config: str) -> Any:
    return abstract_vae_variables(AutoencoderKL(VAE_CONFIGS[config]))


@functools.cache
def vae_variables(config: str) -> Any:
    return random_variables(vae_abstract(config))


def compute_dtype(dtype: str) -> Any:
    """Module dtype argument: None (float32, the parameters' own) or a reduced precision."""
    return None if dtype == "float32" else jnp.dtype(dtype)


def lowered_flops(fn: Callable[..., Any], *abstract_args: Any) -> float:
    """XLA's FLOP count of `fn`, from the lowered (not compiled) program."""
    return float(jax.jit(fn).lower(*abstract_args).cost_analysis()["flops"])


def _student_forward_fn(config: str, dtype: str) -> Callable[..., jnp.ndarray]:
    model, _ = build_model(model_abstract(config)[0], compute_dtype(dtype))
    return lambda v, x, t, ids: model.apply(v, x, t, ids).sample


def _student_inputs(config: str, latent: int, batch: int) -> tuple[np.ndarray, ...]:
    """(sample, timesteps, input_ids) of one sampler step on a guidance batch of `batch` (even) rows."""
    cfg = model_abstract(config)[0]
    sample = np.random.default_rng(1).standard_normal((batch, latent, latent, cfg.unet.in_channels), np.float32)
    return sample, np.array([CFG_TIMESTEP], np.int32), guidance_task_ids(batch // 2, cfg.unet.context_length)


def student_forward(config: str, latent: int, batch: int, dtype: str) -> Program:
    """One UNet call on a CFG batch (as in every sampler step), eval mode; returns the noise."""
    inputs = _student_inputs(config, latent, batch)
    return Program(jax.jit(_student_forward_fn(config, dtype)).lower,
                   (model_abstract(config)[1], *shapes(inputs)),
                   lambda: (model_variables(config), *inputs))


def _vae_fn(config: str, method: str, dtype: str, **kwargs: Any) -> Callable[..., Any]:
    vae_module = AutoencoderKL(VAE_CONFIGS[config], dtype=compute_dtype(dtype))
    return lambda v, x: vae_module.apply(v, x, method=method, **kwargs)


def _vae_input(config: str, method: str, side: int, batch: int = 1) -> np.ndarray:
    """Images in [-1, 1] for encoders, latents of the image side for decoders."""
    cfg = VAE_CONFIGS[config]
    rng = np.random.default_rng(2)
    if method.startswith("encode"):
        return rng.uniform(-1, 1, (batch, side, side, cfg.in_channels)).astype(np.float32)
    latent = side // cfg.downsample_factor
    return rng.standard_normal((batch, latent, latent, cfg.latent_channels), np.float32)


def vae(config: str, method: str, side: int, dtype: str = "float32", **kwargs: Any) -> Program:
    """`AutoencoderKL.<method>` on one image of `side` pixels (kwargs: tile / overlap)."""
    x = _vae_input(config, method, side)
    flops = None
    if method == "decode_tiled":
        # The tiles run in a scan, which XLA's cost analysis counts once: count one tile's decode.
        factor = VAE_CONFIGS[config].downsample_factor
        tiles = len(tile_starts(side // factor, kwargs["tile"], kwargs["overlap"])) ** 2
        tile = shapes(_vae_input(config, "decode", kwargs["tile"] * factor))
        flops = tiles * lowered_flops(_vae_fn(config, "decode", dtype), vae_abstract(config), tile)
    return Program(jax.jit(_vae_fn(config, method, dtype, **kwargs)).lower, (vae_abstract(config), shapes(x)),
                   lambda: (vae_variables(config), x), flops)


def pipeline(student: str, vae_config: str, side: int, batch: int, steps: int = PIPELINE_STEPS) -> Program:
    """The whole sampler program (encode x2, DDIM + CFG loop, decode) in float32, as `Sampler` compiles it."""
    cfg, unet_abstract = model_abstract(student)
    vae_cfg = VAE_CONFIGS[vae_config]
    sampler = Sampler(build_model(cfg)[0], AutoencoderKL(vae_cfg))
    settings = SamplerSettings(num_steps=steps)
    factor = vae_cfg.downsample_factor
    latent = side // factor
    rng = np.random.default_rng(4)
    image = rng.uniform(-1, 1, (batch, side, side, vae_cfg.in_channels)).astype(np.float32)
    pixel_mask = rng.uniform(size=(batch, side, side, 1)) < 0.3
    noise = jax.tree.map(np.asarray, SamplerNoise.draw(jax.random.key(5), batch, (latent, latent),
                                                       vae_cfg.latent_channels))
    inputs = (image, np.where(pixel_mask, 0.0, image).astype(np.float32),
              latent_mask(pixel_mask, factor).astype(np.float32), noise,
              np.float32(GUIDANCE_SCALE), np.float32(NOISE_OFFSET), np.int32(ALWAYS_GUIDE))

    # The denoising loop is a scan: sum its parts' counts (two encodes, the steps, one decode).
    num_steps = len(ddim_timesteps(steps, settings.strength))
    step_inputs = shapes(_student_inputs(student, latent, 2 * batch))
    flops = (2 * lowered_flops(_vae_fn(vae_config, "encode", "float32"), vae_abstract(vae_config),
                               shapes(_vae_input(vae_config, "encode", side, batch)))
             + num_steps * lowered_flops(_student_forward_fn(student, "float32"), unet_abstract, *step_inputs)
             + lowered_flops(_vae_fn(vae_config, "decode", "float32"), vae_abstract(vae_config),
                             shapes(_vae_input(vae_config, "decode", side, batch))))

    return Program(functools.partial(sampler.lower, settings=settings),
                   (unet_abstract, vae_abstract(vae_config), *shapes(inputs)),
                   lambda: (model_variables(student), vae_variables(vae_config), *inputs), flops)


def inference_cases(sizes: Sizes) -> list[Case]:
    """Every inference case of one mode, cheapest first."""
    s, vae_cfg = sizes, VAE_CONFIGS[sizes.vae]
    latent = s.side // vae_cfg.downsample_factor
    tiling = {"tile": s.tile, "overlap": s.overlap}
    cases = [
        Case("student_forward", dtype, s.student, dtype, (2, latent, latent, 9), 2, "samples/s",
             functools.partial(student_forward, s.student, latent, 2, dtype),
             {"timestep": CFG_TIMESTEP, "cfg_pair": True}, budget_s=s.budget_s)
        for dtype in ("float32", "bfloat16")
    ]
    cases += [
        Case("vae_encode", str(s.side), s.vae, "float32", (1, s.side, s.side, 3), 1, "images/s",
             functools.partial(vae, s.vae, "encode", s.side), budget_s=s.budget_s),
        Case("vae_decode", str(s.side), s.vae, "float32", (1, latent, latent, 4), 1, "images/s",
             functools.partial(vae, s.vae, "decode", s.side), {"image_side": s.side}, budget_s=s.budget_s),
    ]
    for side in s.tiled_sides:
        tiled_latent = side // vae_cfg.downsample_factor
        cases += [
            Case("vae_decode_tiled", str(side), s.vae, "float32", (1, tiled_latent, tiled_latent, 4), 1,
                 "images/s", functools.partial(vae, s.vae, "decode_tiled", side, **tiling),
                 {"image_side": side, **tiling}, compile_only=not s.run_tiled_large, budget_s=s.slow_budget_s),
            Case("vae_decode", str(side), s.vae, "float32", (1, tiled_latent, tiled_latent, 4), 1,
                 "images/s", functools.partial(vae, s.vae, "decode", side), {"image_side": side},
                 compile_only=not s.run_untiled_large, budget_s=s.slow_budget_s),
        ]
    cases += [
        Case("pipeline", f"b{batch}", s.student, "float32", (batch, s.side, s.side, 3), batch, "images/s",
             functools.partial(pipeline, s.student, s.vae, s.side, batch),
             {"steps": PIPELINE_STEPS, "vae": s.vae, "guidance_scale": GUIDANCE_SCALE}, budget_s=s.slow_budget_s)
        for batch in s.pipeline_batches
    ]
    return cases
