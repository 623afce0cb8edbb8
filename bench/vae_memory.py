"""Peak memory of the SD VAE's decode / encode, untiled vs tiled, from XLA's own buffer plan.

    python bench/vae_memory.py [--sizes 1024 2048] [--dtype float32] [--encode]

Prints one JSON object per measurement. Nothing is allocated: the variables are abstract
(jax.eval_shape) and each jitted call is only lowered and compiled, then
`compiled.memory_analysis()` gives the argument, output and temporary buffer sizes; `peak_bytes`
is their sum (an upper bound on what the device needs for that call). Figures are for the
backend it runs on; run it on the accelerator for that accelerator's numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moebius_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL
from moebius_jax.vae_loading import abstract_vae_variables


def measure(name: str, fn: Callable, variables, shape: tuple[int, ...], dtype, **extra) -> dict:
    """Compile `fn(variables, x)` for an abstract x of `shape` and report XLA's memory plan."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(variables, jax.ShapeDtypeStruct(shape, dtype)).compile()
    stats = compiled.memory_analysis()
    sizes = {
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
    }
    return {
        "name": name,
        "dtype": jnp.dtype(dtype).name,
        "shape": list(shape),
        **extra,
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        **sizes,
        "peak_bytes": sum(sizes.values()),
        "peak_gib": round(sum(sizes.values()) / 2**30, 3),
        "compile_s": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image sides in pixels")
    parser.add_argument("--dtype", default="float32", help="compute dtype (parameters stay float32)")
    parser.add_argument("--tile", type=int, default=64, help="decode tile side in latent pixels")
    parser.add_argument("--overlap", type=int, default=16, help="decode tile overlap in latent pixels")
    parser.add_argument("--encode", action="store_true", help="also measure encode / encode_tiled")
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    vae = AutoencoderKL(SD_VAE_CONFIG, dtype=None if dtype == jnp.float32 else dtype)
    variables = abstract_vae_variables(vae)
    f = SD_VAE_CONFIG.downsample_factor
    tiling = {"tile": args.tile, "overlap": args.overlap}
    pixel_tiling = {k: v * f for k, v in tiling.items()}
    for side in args.sizes:
        latent = (1, side // f, side // f, SD_VAE_CONFIG.latent_channels)
        runs = [
            ("decode", lambda v, z: vae.apply(v, z, method="decode"), latent, {}),
            ("decode_tiled", lambda v, z: vae.apply(v, z, **tiling, method="decode_tiled"), latent, tiling),
        ]
        if args.encode:
            image = (1, side, side, SD_VAE_CONFIG.in_channels)
            runs += [
                ("encode", lambda v, x: vae.apply(v, x, method="encode"), image, {}),
                ("encode_tiled", lambda v, x: vae.apply(v, x, **pixel_tiling, method="encode_tiled"), image,
                 pixel_tiling),
            ]
        for name, fn, shape, extra in runs:
            print(json.dumps(measure(name, fn, variables, shape, dtype, image_side=side, **extra)), flush=True)


if __name__ == "__main__":
    main()
