"""Depthwise-separable conv block (timm `DepthwiseSeparableConv` as Moebius configures it)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.layers.batch_norm import BatchNorm
from moebius_jax.layers.depthwise import DepthwiseConv
from moebius_jax.layers.linear import conv2d
from moebius_jax.layers.residual import add_residual


class DepthwiseSeparableConv(nn.Module):
    """depthwise kxk -> BN + ReLU -> pointwise 1x1 -> BN, plus its own input when in == out.

    Used for the student's conv_in, conv_out and both convs of every resnet.
    """

    features: int
    kernel_size: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        in_features = x.shape[-1]
        h = DepthwiseConv(self.kernel_size, use_bias=False, dtype=self.dtype, name="conv_dw")(x)
        h = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(h, train))
        h = conv2d(self.features, 1, use_bias=False, dtype=self.dtype, name="conv_pw")(h)
        h = BatchNorm(dtype=self.dtype, name="bn2")(h, train)
        # timm's residual rule: stride is always 1 here, so only the widths decide.
        return add_residual(x, h) if in_features == self.features else h
