"""Resnet block shared by the student (depthwise-separable convs), the teacher and the VAE (dense convs)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.layers.linear import conv2d, dense
from moebius_jax.layers.dwsep_conv import DepthwiseSeparableConv
from moebius_jax.layers.norms import group_norm
from moebius_jax.layers.residual import add_residual


def spatial_conv(kind: str, features: int, x: jnp.ndarray, train: bool, *, dtype: Any = None,
                 name: str) -> jnp.ndarray:
    """The UNet's 3x3 conv: depthwise-separable ("dwsep", student) or dense ("dense", teacher/VAE).

    Call inside a compact method; the conv becomes a submodule called `name`.
    """
    if kind == "dwsep":
        return DepthwiseSeparableConv(features, dtype=dtype, name=name)(x, train)
    return conv2d(features, 3, dtype=dtype, name=name)(x)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv1 (+ time projection) -> GN -> SiLU -> conv2, plus a (1x1-projected) skip.

    `conv_kind` "dwsep" gives Moebius' DWResnetBlock2D, "dense" the diffusers ResnetBlock2D
    (teacher, VAE). Without `temb` (VAE) there is no time projection.
    """

    features: int
    conv_kind: str = "dwsep"
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = spatial_conv(self.conv_kind, self.features, h, train, dtype=self.dtype, name="conv1")
        if temb is not None:
            t = dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = spatial_conv(self.conv_kind, self.features, h, train, dtype=self.dtype, name="conv2")
        if x.shape[-1] != self.features:
            x = conv2d(self.features, 1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
        return add_residual(x, h)
