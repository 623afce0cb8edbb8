"""Mix-FFN (SANA's GLUMBConv): 1x1 expand + SiLU, depthwise 3x3, GLU gate, 1x1 project."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.layers.depthwise import DepthwiseConv
from moebius_jax.layers.linear import conv2d


class MixFFN(nn.Module):
    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, hw: tuple[int, int], train: bool = False) -> jnp.ndarray:
        del train
        b, n, c = x.shape
        h = x.reshape(b, *hw, c)
        h = nn.silu(conv2d(2 * self.hidden, 1, dtype=self.dtype, name="inverted_conv")(h))
        h = DepthwiseConv(3, dtype=self.dtype, name="depth_conv")(h)
        value, gate = jnp.split(h, 2, axis=-1)
        h = conv2d(c, 1, use_bias=False, dtype=self.dtype, name="point_conv")(value * nn.silu(gate))
        return h.reshape(b, n, c)
