"""Compile-only rows for a target this host may not have: `python -m bench --target tpu:v5e:2x2`.

The programs are the ones the timed rows lower (the `bench.inference` builders), traced on
abstract arguments placed on one device of the target (`moebius_jax.aot`), compiled, and
reported with XLA's figures: compile seconds, per-chip memory against HBM, flops and bytes
accessed (loops counted per iteration), roofline time and bound, collectives. Nothing runs,
so a TPU topology compiles on a CPU-only host (the `tpu` extra); `gpu` and `cpu` compile for
this host's devices. Rows: the student's CFG step (1 and 8 images, bfloat16 compute with the
parameters in bfloat16 as a sampler that casts them once passes them, and once with float32
parameters), VAE encode and decode, and the whole sampler program in bfloat16.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Sequence
from typing import Any

import jax

from bench.harness import HEADER_FIELDS, Case, git_state, header, progress
from bench.inference import (CFG_TIMESTEP, FULL, GUIDANCE_SCALE, PIPELINE_STEPS, QUICK, VAE_CONFIGS, Sizes,
                             pipeline, student_forward, vae)
from moebius_jax import aot

DTYPE = "bfloat16"
STUDENT_BATCHES = (1, 8)  # images per CFG step: the UNet runs twice as many rows

# Every key of a target record and the types its value may have.
TARGET_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "variant": (str,),
    "config": (str,),
    "dtype": (str,),  # compute dtype
    "param_dtype": (str,),  # dtype of the parameters the program is passed
    "shape": (list,),
    "batch": (int,),
    "details": (dict,),
    "target": (str,),
    "devices": (int,),  # devices the program runs on (1: a single-chip program)
    "device_kind": (str,),
    "chip": (dict, type(None)),  # moebius_jax.aot.Chip facts, None for kinds it does not know
    "compile_seconds": (float,),
    "flops": (float,),  # per device
    "bytes_accessed": (float,),
    "loop_cost": (str,),
    "memory": (dict,),  # arguments / outputs / aliased / temporaries / generated_code / total / hbm / fits
    "compute_seconds": (float, type(None)),
    "memory_seconds": (float, type(None)),
    "roofline_seconds": (float, type(None)),
    "bound": (str, type(None)),
    "collectives": (list,),
    "git_commit": (str, type(None)),
    "timestamp": (str,),
}

TARGET_HEADER_FIELDS: dict[str, tuple[type, ...]] = {
    **HEADER_FIELDS,  # device_kind / platform / device_count describe the target, not this host
    "target": (str,),
    "chip": (dict, type(None)),
    "jaxlib_version": (str,),
    "libtpu_version": (str, type(None)),
}


def target_cases(sizes: Sizes) -> list[Case]:
    """The inference rows of one mode (QUICK: tiny configs, FULL: the paper's sizes)."""
    s, vae_cfg = sizes, VAE_CONFIGS[sizes.vae]
    latent = s.side // vae_cfg.downsample_factor
    step = {"timestep": CFG_TIMESTEP, "cfg_pair": True}
    cases = [
        Case("student_forward", f"b{images}", s.student, DTYPE, (2 * images, latent, latent, 9), 2 * images,
             "samples/s", functools.partial(student_forward, s.student, latent, 2 * images, DTYPE, DTYPE),
             {**step, "param_dtype": DTYPE})
        for images in STUDENT_BATCHES
    ]
    cases.append(
        Case("student_forward", "b1_float32_params", s.student, DTYPE, (2, latent, latent, 9), 2, "samples/s",
             functools.partial(student_forward, s.student, latent, 2, DTYPE, "float32"),
             {**step, "param_dtype": "float32"}))
    cases += [
        Case("vae_encode", str(s.side), s.vae, DTYPE, (1, s.side, s.side, 3), 1, "images/s",
             functools.partial(vae, s.vae, "encode", s.side, DTYPE, DTYPE), {"param_dtype": DTYPE}),
        Case("vae_decode", str(s.side), s.vae, DTYPE, (1, latent, latent, 4), 1, "images/s",
             functools.partial(vae, s.vae, "decode", s.side, DTYPE, DTYPE), {"image_side": s.side, "param_dtype": DTYPE}),
        Case("pipeline", "b1", s.student, DTYPE, (1, s.side, s.side, 3), 1, "images/s",
             functools.partial(pipeline, s.student, s.vae, s.side, 1, dtype=DTYPE),
             {"steps": PIPELINE_STEPS, "vae": s.vae, "guidance_scale": GUIDANCE_SCALE, "param_dtype": "float32"}),
    ]
    return cases


def target_plan(quick: bool, extra_cases: Sequence[Case] = ()) -> list[Case]:
    """The rows for a target: `target_cases`, then `extra_cases` — e.g. train steps over the
    target's mesh, whose abstract arguments carry their own shardings on
    `aot.target_devices(target)` (arguments without one go to the target's first device)."""
    return target_cases(QUICK if quick else FULL) + list(extra_cases)


def target_header(target: str, devices: Sequence[jax.Device], mode: str) -> dict[str, Any]:
    """The results file's first object: the target's devices, this host, versions, commit."""
    versions = aot.versions()
    chip = aot.chip_of(devices[0])
    return {
        **header(mode),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "target": target,
        "chip": None if chip is None else dataclasses.asdict(chip),
        "jaxlib_version": versions["jaxlib"],
        "libtpu_version": versions["libtpu"],
    }


def measure_target(case: Case, target: str) -> dict[str, Any]:
    """Compile `case` for `target` (nothing runs) and return its record (`TARGET_FIELDS`)."""
    program = case.build()
    progress(f"  compiling {case.key} for {target}")
    traced = program.trace(*aot.abstract(program.abstract_args, aot.single_device(target)))
    report, _ = aot.compile_traced(traced, name=case.key, target=target)
    progress("  " + report.summary().replace("\n", "\n  "))
    figures = report.to_json()
    del figures["name"]
    commit, _ = git_state()
    return {
        "name": case.name,
        "variant": case.variant,
        "config": case.config,
        "dtype": case.dtype,
        "param_dtype": case.details.get("param_dtype", "float32"),
        "shape": list(case.shape),
        "batch": case.batch,
        "details": dict(case.details),
        **figures,
        "git_commit": commit,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
