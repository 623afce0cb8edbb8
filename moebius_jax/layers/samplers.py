"""2x down- and up-sampling between UNet levels."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.layers.linear import conv2d


class Downsample(nn.Module):
    """3x3 stride-2 conv. `pad_bottom_right` is the VAE encoder's variant (pad (0,1), then no padding)."""

    pad_bottom_right: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.pad_bottom_right:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv2d(x.shape[-1], 3, stride=2, padding=0, dtype=self.dtype, name="conv")(x)
        return conv2d(x.shape[-1], 3, stride=2, padding=1, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (out[y, x] = in[y // 2, x // 2]) followed by a 3x3 conv."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv2d(x.shape[-1], 3, dtype=self.dtype, name="conv")(x)
