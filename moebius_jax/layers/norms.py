"""GroupNorm / LayerNorm with torch's numerics (two-pass variance) and explicit epsilons.

Flax defaults to eps 1e-6 and a one-pass E[x^2] - E[x]^2 variance; the reference uses
several epsilons (1e-5 resnets, 1e-6 transformer wrappers and VAE) and a two-pass variance.
Statistics are float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.layers.linear import output_dtype


class GroupNorm(nn.GroupNorm):
    """Flax's GroupNorm returning the project's layer dtype (`linear.output_dtype`)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, *args: Any, **kwargs: Any) -> jnp.ndarray:
        return super().__call__(x, *args, **kwargs).astype(output_dtype(x, self.dtype))


class LayerNorm(nn.LayerNorm):
    """Flax's LayerNorm returning the project's layer dtype (`linear.output_dtype`)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, *args: Any, **kwargs: Any) -> jnp.ndarray:
        return super().__call__(x, *args, **kwargs).astype(output_dtype(x, self.dtype))


def group_norm(groups: int, eps: float, dtype: Any = None, name: str | None = None) -> GroupNorm:
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(eps: float, dtype: Any = None, name: str | None = None) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)
