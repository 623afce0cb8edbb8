"""Train-step benchmarks: one optimizer step as the training loop compiles it.

The step is `moebius_jax.train.step.make_train_step` (VAE encode of image and masked image,
noise and timesteps, student forward and backward in train mode, adaptive loss weights,
clipping, Muon) with the state donated and threaded from call to call, as in
`moebius_jax.train.loop`. "student" is the task loss only; "distill" adds the frozen
PixelHacker teacher's forward and the output and feature distillation terms. FLOPs are XLA's
count of the whole step (no loops in it), so MFU includes the optimizer and the VAE.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from bench.harness import Case, Program
from bench.inference import (MODEL_CONFIGS, VAE_CONFIGS, compute_dtype, model_abstract, model_variables, shapes,
                             vae_abstract, vae_variables)
from moebius_jax.latents import task_ids
from moebius_jax.loading import build_model
from moebius_jax.models.vae import AutoencoderKL
from moebius_jax.train.config import DataConfig, TrainConfig
from moebius_jax.train.optimizer import make_optimizer
from moebius_jax.train.state import TrainState
from moebius_jax.train.step import Frozen, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """One (student, VAE, teacher) triple at one image size and global batch."""

    label: str  # "tiny" | "full"
    student: str
    vae: str
    teacher: str
    side: int
    batch: int
    run_distill: bool = True  # run the distillation step, or only compile it (FLOPs, memory plan)


TINY = TrainSetup("tiny", "moebius_tiny", "vae_tiny", "pixelhacker_tiny", side=128, batch=2)
FULL = TrainSetup("full", "moebius", "sd_vae", "pixelhacker", side=512, batch=8)
# On a CPU a full-size step is minutes (four SD encodes alone are ~4 TFLOP) and the 0.86B
# teacher's forward more: batch 2, and the distillation step runs only with --all.
FULL_CPU = dataclasses.replace(FULL, batch=2, run_distill=False)
FULL_CPU_ALL = dataclasses.replace(FULL_CPU, run_distill=True)


def _batch(setup: TrainSetup) -> dict[str, np.ndarray]:
    """A training batch as moebius_jax.data yields it: images in [-1, 1], {0, 1} mask, task ids."""
    rng = np.random.default_rng(6)
    b, s = setup.batch, setup.side
    image = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
    mask = (rng.uniform(size=(b, s, s, 1)) < 0.3).astype(np.float32)
    context = model_abstract(setup.student)[0].unet.context_length
    return {"image": image, "masked_image": image * (1 - mask), "mask": mask,
            "input_ids": np.tile(task_ids("background", context), (b, 1))}


def train_step(setup: TrainSetup, distill: bool, dtype: str) -> Program:
    """One step of the reference recipe (TrainConfig defaults: Muon, adaptive weights) at `dtype`."""
    module_dtype = compute_dtype(dtype)
    student = build_model(MODEL_CONFIGS[setup.student], module_dtype)[0]
    teacher = build_model(MODEL_CONFIGS[setup.teacher], module_dtype)[0] if distill else None
    config = TrainConfig(model=str(MODEL_CONFIGS[setup.student]), dtype=dtype,
                         data=DataConfig(image_size=setup.side, batch_size=setup.batch))
    student_abstract = model_abstract(setup.student)[1]
    tx = make_optimizer(config.optimizer, student_abstract["params"])
    step = make_train_step(student, AutoencoderKL(VAE_CONFIGS[setup.vae], dtype=module_dtype), tx, config, teacher)
    key = jax.random.key(config.seed)
    create = functools.partial(TrainState.create, tx=tx, key=key, ema_decay=config.ema_decay)
    batch = _batch(setup)
    abstract_frozen = Frozen(vae_abstract(setup.vae), model_abstract(setup.teacher)[1] if distill else None)

    def make_args() -> tuple[Any, ...]:
        frozen = Frozen(vae_variables(setup.vae), model_variables(setup.teacher) if distill else None)
        return create(model_variables(setup.student)), frozen, batch

    # The loop donates the state; the harness threads each call's new state into the next.
    return Program(jax.jit(step, donate_argnums=(0,)).lower,
                   (jax.eval_shape(create, student_abstract), abstract_frozen, shapes(batch)),
                   make_args, threaded=True)


def training_cases(setups: tuple[TrainSetup, ...], dtype: str, budget_s: float) -> list[Case]:
    """A student-only and a distillation step per setup, in `dtype` (bfloat16 is the recipe's)."""
    cases = []
    for setup in setups:
        for distill in (False, True):
            details = {"vae": setup.vae, "teacher": setup.teacher if distill else None, "optimizer": "muon",
                       "image_side": setup.side}
            cases.append(Case(
                "train_step", f"{setup.label}_{'distill' if distill else 'student'}", setup.student, dtype,
                (setup.batch, setup.side, setup.side, 3), setup.batch, "images/s",
                functools.partial(train_step, setup, distill, dtype), details,
                compile_only=distill and not setup.run_distill, budget_s=budget_s))
    return cases
