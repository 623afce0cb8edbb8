"""GroupNorm / LayerNorm with torch's numerics (two-pass variance) and explicit epsilons.

Flax defaults to eps 1e-6 and a one-pass E[x^2] - E[x]^2 variance; the reference uses
several epsilons (1e-5 resnets, 1e-6 transformer wrappers and VAE) and a two-pass variance.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn


def group_norm(groups: int, eps: float, dtype: Any = None, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(eps: float, dtype: Any = None, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)
