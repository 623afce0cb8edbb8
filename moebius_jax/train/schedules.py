"""Learning-rate schedules of the reference (diffusers' `get_scheduler` rules) as optax schedules.

A schedule maps the 0-based optimizer step to the lr used by that step: the reference's
LambdaLR is stepped after `optimizer.step()`, so its first step uses factor(0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def _warmup_factor(step: jax.Array, warmup_steps: int) -> jax.Array:
    """step / max(1, warmup): 0 at step 0, reaching 1 at step = warmup."""
    return step / max(1, warmup_steps)


def constant_with_warmup(learning_rate: float, warmup_steps: int = 0) -> optax.Schedule:
    """lr·step/max(1, warmup) while step < warmup, then lr (diffusers' constant_with_warmup)."""

    def schedule(step) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        factor = jnp.where(step < warmup_steps, _warmup_factor(step, warmup_steps), 1.0)
        return learning_rate * factor

    return schedule


def cosine_with_warmup(
    learning_rate: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0, then a half cosine from lr down to `min_lr` at `total_steps`.

    With min_lr = 0 this is diffusers' `cosine` (num_cycles 0.5) up to total_steps; past it
    diffusers' cosine climbs again, here it stays at min_lr.
    """
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")

    def schedule(step) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
        decayed = min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        warming = learning_rate * _warmup_factor(step, warmup_steps)
        return jnp.where(step < warmup_steps, warming, decayed)

    return schedule
