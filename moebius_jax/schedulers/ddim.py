"""Deterministic DDIM sampling (eta = 0) as the reference pipeline runs it: "leading" timesteps,
the img2img strength cut, and a step that is a pure function of a (possibly traced) timestep."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from moebius_jax.schedulers.noise_schedule import (
    NUM_TRAIN_TIMESTEPS,
    expand_per_sample,
    pred_original_sample,
)


def ddim_step_ratio(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """Gap between consecutive DDIM timesteps; set by the step count *before* the strength cut."""
    return num_train_timesteps // num_steps


def ddim_timesteps(
    num_steps: int, strength: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
    """Descending "leading" timesteps (n−1−i)·(N // n), less the first ones the strength cut drops.

    strength 0.99 with 20 steps keeps 19 steps, 900..0, as the reference pipeline.
    """
    ratio = ddim_step_ratio(num_steps, num_train_timesteps)
    timesteps = np.arange(num_steps - 1, -1, -1, dtype=np.int64) * ratio
    init_steps = min(int(num_steps * strength), num_steps)
    return timesteps[max(num_steps - init_steps, 0) :]


def ddim_step(
    alphas_cumprod: ArrayLike,
    final_alpha_cumprod: ArrayLike,
    model_output: ArrayLike,
    timestep: ArrayLike,
    sample: ArrayLike,
    step_ratio: ArrayLike,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One eta = 0 DDIM update t → t − step_ratio; returns (prev_sample, pred_original_sample).

    `timestep` may be traced (scalar, (1,) or (B,)); below t = 0 ᾱ_prev is `final_alpha_cumprod`.
    """
    alphas_cumprod = jnp.asarray(alphas_cumprod)
    sample = jnp.asarray(sample)
    prev_t = jnp.asarray(timestep) - step_ratio
    # where() instead of Python branching keeps the step traceable; the clamp only keeps the
    # unused gather in range.
    alpha_prev = jnp.where(
        prev_t >= 0,
        alphas_cumprod[jnp.maximum(prev_t, 0)],
        jnp.asarray(final_alpha_cumprod, dtype=alphas_cumprod.dtype),
    )
    alpha_prev = expand_per_sample(alpha_prev, sample.ndim)
    x0 = pred_original_sample(alphas_cumprod, model_output, timestep, sample)
    # eta = 0: no noise term, the direction to x_t is the full √(1−ᾱ_prev)·ε.
    prev_sample = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * jnp.asarray(model_output)
    return prev_sample, x0
