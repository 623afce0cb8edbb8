"""Compile-only rows for a target this host may not have: `python -m bench --target tpu:v5e:2x2`.

The programs are the ones the timed rows lower (the `bench.inference` builders), traced on
abstract arguments placed on one device of the target (`moebius_jax.aot`), compiled, and
reported with XLA's figures: compile seconds, per-chip memory against HBM, flops and bytes
accessed (loops counted per iteration), roofline time and bound, collectives. Nothing runs,
so a TPU topology compiles on a CPU-only host (the `tpu` extra); `gpu` and `cpu` compile for
this host's devices. Rows: the student's CFG step (1 and 8 images, bfloat16 compute with the
parameters in bfloat16 as a sampler that casts them once passes them, and once with float32
parameters), VAE encode and decode, and the whole sampler program in bfloat16 — each a
single-chip program — and the trainer's own step (`moebius_jax.train.compile_only`: student
only, and distillation with the frozen teacher and VAE) at a stated global batch over a mesh
of every device of the target, laid out by the trainer's default mesh rules.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Sequence
from typing import Any

import jax

from bench.harness import HEADER_FIELDS, REPO, Case, Program, git_state, header, progress
from bench.inference import (CFG_TIMESTEP, FULL, GUIDANCE_SCALE, PIPELINE_STEPS, QUICK, VAE_CONFIGS, Sizes,
                             pipeline, student_forward, vae)
from moebius_jax import aot
from moebius_jax.train.config import DataConfig, TeacherConfig, TrainConfig
from moebius_jax.train.compile_only import trace_train_step

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
    "model_flops": (float, type(None)),  # the whole program, all devices (what MFU divides by)
    "mfu": (float, type(None)),
    "hbm": (dict, type(None)),  # TPU: bytes in HBM, their seconds, the HBM roofline, its bound and MFU
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
             functools.partial(vae, s.vae, "decode", s.side, DTYPE, DTYPE),
             {"image_side": s.side, "param_dtype": DTYPE}),
        Case("pipeline", "b1", s.student, DTYPE, (1, s.side, s.side, 3), 1, "images/s",
             functools.partial(pipeline, s.student, s.vae, s.side, 1, dtype=DTYPE),
             {"steps": PIPELINE_STEPS, "vae": s.vae, "guidance_scale": GUIDANCE_SCALE, "param_dtype": "float32"}),
    ]
    return cases


@dataclasses.dataclass(frozen=True)
class TrainTarget:
    """One size of the trainer's step for a target: networks, image side and global batch."""

    student: str
    vae: str
    teacher: str
    side: int
    global_batch: int
    remat_distill: bool  # also a distillation row with rematerialisation


TRAIN_QUICK = TrainTarget("moebius_tiny", "vae_tiny", "pixelhacker_tiny", side=128, global_batch=8,
                          remat_distill=False)
TRAIN_FULL = TrainTarget("moebius", "sd_vae", "pixelhacker", side=512, global_batch=32, remat_distill=True)


def train_config(t: TrainTarget, distill: bool, remat: bool = False) -> TrainConfig:
    """The trainer's config for a row: the recipe's defaults (Muon, adaptive weights, bfloat16
    compute, the default mesh rules over every device) at `t`'s sizes."""
    teacher = TeacherConfig(config=str(REPO / "configs" / f"{t.teacher}.yaml") if distill else None)
    return TrainConfig(model=str(REPO / "configs" / f"{t.student}.yaml"), teacher=teacher, remat=remat,
                       data=DataConfig(image_size=t.side, batch_size=t.global_batch))


def train_program(t: TrainTarget, distill: bool, remat: bool, target: str) -> Program:
    """The trainer's step on a mesh of all of `target`'s devices, traced on abstract sharded
    arguments (`trace_train_step`). Compile only: nothing is ever allocated."""
    traced = trace_train_step(train_config(t, distill, remat), target, VAE_CONFIGS[t.vae])

    def no_arguments() -> tuple[Any, ...]:
        raise NotImplementedError("target rows compile only")

    return Program(lambda: traced, (), no_arguments)


def train_cases(t: TrainTarget, target: str) -> list[Case]:
    """Student-only and distillation steps (and a remat one when `t` asks) for `target`."""
    rows = [(False, False), (True, False)] + ([(True, True)] if t.remat_distill else [])
    devices = len(aot.target_devices(target))
    cases = []
    for distill, remat in rows:
        config = train_config(t, distill, remat)
        details = {"vae": t.vae, "teacher": t.teacher if distill else None, "optimizer": config.optimizer.name,
                   "image_side": t.side, "global_batch": t.global_batch, "per_device_batch": t.global_batch // devices,
                   "mesh": {"data": devices // config.mesh.fsdp, "fsdp": config.mesh.fsdp}, "remat": remat, "param_dtype": "float32"}
        variant = f"{'distill' if distill else 'student'}{'_remat' if remat else ''}_b{t.global_batch}"
        cases.append(Case("train_step", variant, t.student, config.dtype, (t.global_batch, t.side, t.side, 3),
                          t.global_batch, "images/s", functools.partial(train_program, t, distill, remat, target),
                          details))
    return cases


def target_plan(quick: bool, target: str) -> list[Case]:
    """The rows for a target: `target_cases`, then the trainer's steps over its mesh."""
    return target_cases(QUICK if quick else FULL) + train_cases(TRAIN_QUICK if quick else TRAIN_FULL, target)


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
    # Arguments without a sharding (the single-chip rows) go to the target's first device.
    traced = program.trace(*aot.abstract(program.abstract_args, aot.single_device(target)))
    report, _ = aot.compile_traced(traced, name=case.key, target=target)
    progress("  " + report.summary().replace("\n", "\n  "))
    figures = report.to_json()
    del figures["name"]
    commit, _ = git_state()
    return {
        **case.identity(),
        "param_dtype": case.details.get("param_dtype", "float32"),
        **figures,
        "git_commit": commit,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
