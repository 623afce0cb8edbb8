"""BatchNorm with PyTorch's exact semantics (the Moebius student is full of them).

Flax's BatchNorm updates the running variance with the biased batch variance; PyTorch uses
the unbiased one (n / (n - 1)). Training dynamics and exported statistics must match the
reference, so this module follows PyTorch: normalise with the biased batch variance, update
`var` with the unbiased one, and count updates like `num_batches_tracked`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """Normalises over every axis but the last; running stats live in `batch_stats`.

    train=False uses the running statistics (inference). train=True uses batch statistics
    and, when `batch_stats` is mutable, updates `mean`, `var` (momentum 0.1, unbiased) and
    `count` as torch does.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))

        dtype = self.dtype or x.dtype
        # Statistics in float32 whatever the compute dtype: bf16 sums over 4096 tokens drift.
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                n = xf.size // features
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
                count.value = count.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * scale
        y = (xf - mean) * inv + bias
        return y.astype(dtype)
