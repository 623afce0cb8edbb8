"""Training-time timestep sampling; DDPM noising and x̂0 are in noise_schedule."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from moebius_jax.schedulers.noise_schedule import NUM_TRAIN_TIMESTEPS


def sample_timesteps(
    key: jax.Array,
    batch: int,
    mode: Literal["lognorm", "uniform"] = "lognorm",
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> jax.Array:
    """Per-sample int32 training timesteps in [0, N−1].

    "lognorm" (the reference's --lognorm_t): t = int(sigmoid(z)·N), z ~ N(0, 1) in float32, a
    logit-normal truncated to an integer; "uniform": t ~ randint(0, N).
    """
    if mode == "lognorm":
        z = jax.random.normal(key, (batch,), dtype=jnp.float32)
        # astype truncates toward zero like the reference's .long(); jax's float32 normal draws
        # stay within about ±5.5, so sigmoid(z) < 1 and t never reaches N.
        return (jax.nn.sigmoid(z) * num_train_timesteps).astype(jnp.int32)
    if mode == "uniform":
        return jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
    raise ValueError(f"unknown timestep sampling mode {mode!r}; expected 'lognorm' or 'uniform'")
