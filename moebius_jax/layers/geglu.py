"""GEGLU feed-forward of diffusers' BasicTransformerBlock (the teacher's `ff`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moebius_jax.layers.linear import dense


class GEGLUFeedForward(nn.Module):
    """Linear C -> 2*H, value * GELU(gate) (exact erf GELU), Linear H -> C; H = int(mult*C)."""

    mult: float = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, hw: tuple[int, int] | None = None, train: bool = False) -> jnp.ndarray:
        del hw, train
        c = x.shape[-1]
        hidden = int(self.mult * c)
        value, gate = jnp.split(dense(2 * hidden, dtype=self.dtype, name="proj_in")(x), 2, axis=-1)
        return dense(c, dtype=self.dtype, name="proj_out")(value * jax.nn.gelu(gate, approximate=False))
