"""The whole sampler as one portable program (`jax.export`, serialised StableHLO), runnable from
plain JAX on any machine: no moebius-jax, Flax or model code needed to use it.

    python -m moebius_jax.export --out sampler.stablehlo [--resolution 512 | HxW] [--batch 1]
        [--steps 20] [--strength 0.99] [--dtype float32 | bfloat16] [--bake-weights]
        [--weights W --vae V --config C | --variant V] [--platforms cpu,cuda,tpu] [--overwrite]

The program takes (weights, image, mask, seed, guidance_scale, noise_offset, cfg_until):
image uint8 (B, H, W, 3) and mask uint8 (B, H, W) (>= 128 = fill) at the exported size, seed
int32, guidance_scale and noise_offset float32, cfg_until int32 (guidance on the first
cfg_until steps; 2**31 - 1 = every step). It returns the inpainted image uint8 (B, H, W, 3):
binarise, VAE encode, the DDIM + guidance loop, decode and the uint8 conversion, with image
k's noise drawn exactly as `InpaintPipeline` draws it for image k of a call with that seed.
So it equals the pipeline with `paste=False, reference_size=True` on images already at the
exported size. The host-side steps (resizing, the blurred paste) stay outside.

Weights: by default they are an argument and are written beside the program as
`<out>.weights.npz`, one array per '/'-joined variable path (the program's first argument is
that dict, e.g. `dict(np.load(...))`); one program then serves any fine-tune of the same
architecture. `--bake-weights` embeds them as constants instead: one self-contained file, and
the weights argument disappears. Shapes, steps, strength and dtype are fixed at export.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moebius_jax import cli, hub
from moebius_jax.inspect_model import parse_resolution
from moebius_jax.io_safety import atomic_output, check_output_file
from moebius_jax.pipeline.inpaint import DTYPES, InpaintPipeline, batch_noise, window_key
from moebius_jax.pipeline.postprocess import to_uint8
from moebius_jax.pipeline.preprocess import LATENT_DOWNSAMPLE, SIZE_MULTIPLE, model_arrays
from moebius_jax.pipeline.sampler import SamplerSettings

log = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".weights.npz"
_SEP = "/"


def flat_weights(pipe: InpaintPipeline) -> dict[str, np.ndarray]:
    """The pipeline's variables as the program's weights argument: {'unet/params/...': array}."""
    tree = {"unet": pipe.unet_variables, "vae": pipe.vae_variables}
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep=_SEP).items()}


def sampler_function(pipe: InpaintPipeline, batch: int, height: int, width: int,
                     settings: SamplerSettings) -> Callable[..., jax.Array]:
    """f(weights, image_u8, mask_u8, seed, guidance_scale, noise_offset, cfg_until) -> uint8 images."""
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(f"resolution {height}x{width}: both sides must be multiples of {SIZE_MULTIPLE}")
    latent_hw = (height // LATENT_DOWNSAMPLE, width // LATENT_DOWNSAMPLE)

    def sample(weights, image_u8, mask_u8, seed, guidance_scale, noise_offset, cfg_until):
        variables = traverse_util.unflatten_dict(dict(weights), sep=_SEP)
        image, _, masked_image, latent_mask = model_arrays(image_u8, mask_u8, jnp)
        key = jax.random.key(seed)
        noise = batch_noise([window_key(key, i) for i in range(batch)], latent_hw)
        # The sampler's traceable body (its __call__ compiles ahead of time instead).
        out = pipe.sampler._sample(variables["unet"], variables["vae"], image, masked_image, latent_mask,
                                   noise, guidance_scale, noise_offset, cfg_until, settings=settings)
        return to_uint8(out.decoded, jnp)

    return sample


def input_specs(batch: int, height: int, width: int) -> list[jax.ShapeDtypeStruct]:
    """The program's arguments after the weights."""
    return [
        jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8),
        jax.ShapeDtypeStruct((batch, height, width), jnp.uint8),
        jax.ShapeDtypeStruct((), jnp.int32),  # seed
        jax.ShapeDtypeStruct((), jnp.float32),  # guidance_scale
        jax.ShapeDtypeStruct((), jnp.float32),  # noise_offset
        jax.ShapeDtypeStruct((), jnp.int32),  # cfg_until
    ]


def export_sampler(pipe: InpaintPipeline, *, batch: int = 1, height: int = 512, width: int = 512,
                   settings: SamplerSettings = SamplerSettings(guidance_cutoff=True), bake_weights: bool = False,
                   platforms: Sequence[str] | None = None) -> tuple[jax.export.Exported, dict[str, np.ndarray] | None]:
    """The exported sampler, and the weights to pass it (None when baked in). With
    `settings.guidance_cutoff` False the program ignores its cfg_until argument (smaller, and
    it compiles faster)."""
    sample = sampler_function(pipe, batch, height, width, settings)
    weights = flat_weights(pipe)
    if bake_weights:
        constants = {k: jnp.asarray(v) for k, v in weights.items()}
        program = jax.jit(lambda *inputs: sample(constants, *inputs))
        specs = input_specs(batch, height, width)
    else:
        program = jax.jit(sample)
        specs = [{k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()},
                 *input_specs(batch, height, width)]
    exported = jax.export.export(program, platforms=platforms)(*specs)
    return exported, None if bake_weights else weights


def weights_path(out: pathlib.Path) -> pathlib.Path:
    """`sampler.stablehlo` -> `sampler.weights.npz`."""
    return out.with_name(out.stem + WEIGHTS_SUFFIX)


def output_paths(out: pathlib.Path, bake_weights: bool, overwrite: bool = False) -> list[pathlib.Path]:
    """The files an export writes; FileExistsError if any exists and not `overwrite`."""
    paths = [out] if bake_weights else [out, weights_path(out)]
    for path in paths:
        check_output_file(path, "--out")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    return paths


def write_export(out: pathlib.Path, exported: jax.export.Exported, weights: Mapping[str, np.ndarray] | None,
                 overwrite: bool = False) -> list[pathlib.Path]:
    """Write the program (and its weights); refuses to replace existing files unless `overwrite`."""
    paths = output_paths(out, weights is None, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        tmp.write_bytes(exported.serialize())
    if weights is not None:
        with atomic_output(paths[1]) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **weights)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m moebius_jax.export", description=__doc__)
    p.add_argument("--out", required=True, type=pathlib.Path, help="the serialised program (e.g. sampler.stablehlo)")
    p.add_argument("--resolution", type=parse_resolution, default=None,
                   help="image side, or HxW; multiples of 64 (default: the config's image size)")
    p.add_argument("--batch", type=cli.positive_int, default=1, help="images per call")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="DDIM steps before the strength cut")
    p.add_argument("--strength", type=cli.fraction, default=0.99, help="in (0, 1]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    p.add_argument("--bake-weights", action="store_true", help="embed the weights in the program")
    p.add_argument("--weights", default=None, help="student weights (default: the released --variant)")
    p.add_argument("--variant", choices=hub.VARIANTS, default=None,
                   help="released student to fetch when --weights is not given (default: pretrained)")
    p.add_argument("--vae", default=None, help=f"VAE (default: {hub.DEFAULT_VAE})")
    p.add_argument("--config", default=None, help="model YAML (default: saved with the weights, else configs/moebius.yaml)")
    p.add_argument("--platforms", default=None,
                   help="comma-separated platforms to lower for, e.g. cpu,cuda,tpu (default: this machine's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # force: an imported library (absl) may already have put a handler on the root logger.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):  # backend probing, per-restore chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    output_paths(args.out, args.bake_weights, args.overwrite)  # before the slow part
    with cli.user_inputs():
        pipe = InpaintPipeline.from_pretrained(args.weights, args.vae, config=args.config, dtype=args.dtype,
                                               variant=args.variant)
    resolution = args.resolution or pipe.resolution
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    platforms = args.platforms.split(",") if args.platforms else None
    with cli.user_inputs():  # a resolution the model cannot take
        exported, weights = export_sampler(
            pipe, batch=args.batch, height=height, width=width,
            settings=SamplerSettings(num_steps=args.steps, strength=args.strength, guidance_cutoff=True),
            bake_weights=args.bake_weights, platforms=platforms)
    paths = write_export(args.out, exported, weights, overwrite=args.overwrite)
    log.info("wrote %s (platforms %s; inputs %s)", ", ".join(map(str, paths)), ", ".join(exported.platforms),
             ", ".join(str(a) for a in exported.in_avals[len(exported.in_avals) - 6:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
