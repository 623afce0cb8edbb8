"""Sinusoidal timestep features and the MLP that turns them into the resnets' conditioning."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.layers.linear import dense


def timestep_sinusoid(timesteps: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """(B,) timesteps -> (B, dim) float32 features, cosines first (flip_sin_to_cos, shift 0).

    Always float32, as the reference: at t ~ 900 the phases reach ~900 rad, where lower
    precision would visibly move the embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding without extras)."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))
