"""Noise schedulers as pure functions of arrays: the schedule tables, DDPM noising, DDIM steps."""

from moebius_jax.schedulers.ddim import ddim_step, ddim_step_ratio, ddim_timesteps
from moebius_jax.schedulers.ddpm import sample_timesteps
from moebius_jax.schedulers.noise_schedule import (
    BETA_END,
    BETA_START,
    NUM_TRAIN_TIMESTEPS,
    NoiseSchedule,
    add_noise,
    pred_original_sample,
    scaled_linear_schedule,
)

__all__ = [
    "BETA_END",
    "BETA_START",
    "NUM_TRAIN_TIMESTEPS",
    "NoiseSchedule",
    "add_noise",
    "ddim_step",
    "ddim_step_ratio",
    "ddim_timesteps",
    "pred_original_sample",
    "sample_timesteps",
    "scaled_linear_schedule",
]
