"""Transformer block with token mixers chosen by config, and its 2-D wrapper.

One block serves both networks: the Moebius student (Local-lambda self, Interactive-lambda
cross, Mix-FFN) and the PixelHacker teacher (Gated Linear Attention self, softmax cross,
GEGLU). Every mixer is called with the map size (H, W) so none has to guess it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.config import LevelConfig
from moebius_jax.layers.attention import Attention
from moebius_jax.layers.cross_lambda import CrossLambda
from moebius_jax.layers.geglu import GEGLUFeedForward
from moebius_jax.layers.gla import GatedLinearAttention
from moebius_jax.layers.linear import conv2d
from moebius_jax.layers.local_lambda import LocalLambda
from moebius_jax.layers.mix_ffn import MixFFN
from moebius_jax.layers.norms import group_norm, layer_norm


class TransformerBlock(nn.Module):
    """x + self(LN x); x + cross(LN x, ctx); x + ff(LN x) — a mixer set to "none" is skipped."""

    level: LevelConfig
    num_heads: int
    table_side: int
    context_length: int
    mlp_ratio: float
    lambda_kernel_size: int = 15
    dtype: Any = None

    def _self_mixer(self) -> nn.Module:
        kind = self.level.self_mixer
        if kind == "local_lambda":
            return LocalLambda(self.num_heads, self.lambda_kernel_size, dtype=self.dtype, name="attn1")
        if kind == "gla":
            return GatedLinearAttention(num_heads=self.num_heads, dtype=self.dtype, name="attn1")
        raise ValueError(f"unknown self mixer {kind!r}")

    def _cross_mixer(self) -> nn.Module:
        kind = self.level.cross_mixer
        if kind == "cross_lambda":
            return CrossLambda(self.num_heads, self.table_side, self.context_length, dtype=self.dtype, name="attn2")
        if kind == "attention":
            return Attention(self.num_heads, dtype=self.dtype, name="attn2")
        raise ValueError(f"unknown cross mixer {kind!r}")

    def _feed_forward(self, channels: int) -> nn.Module:
        kind = self.level.feed_forward
        if kind == "mix_ffn":
            return MixFFN(int(channels * self.mlp_ratio), dtype=self.dtype, name="ff")
        if kind == "geglu":
            return GEGLUFeedForward(dtype=self.dtype, name="ff")
        raise ValueError(f"unknown feed-forward {kind!r}")

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, hw: tuple[int, int], train: bool = False) -> jnp.ndarray:
        if self.level.self_mixer != "none":
            x = x + self._self_mixer()(layer_norm(1e-5, self.dtype, "norm1")(x), hw=hw, train=train)
        if self.level.cross_mixer != "none":
            x = x + self._cross_mixer()(layer_norm(1e-5, self.dtype, "norm2")(x), context, hw=hw, train=train)
        return x + self._feed_forward(x.shape[-1])(layer_norm(1e-5, self.dtype, "norm3")(x), hw=hw, train=train)


class Transformer2D(nn.Module):
    """GroupNorm -> 1x1 proj_in -> transformer blocks over raster-ordered tokens -> 1x1 proj_out, + input."""

    level: LevelConfig
    num_heads: int
    table_side: int
    context_length: int
    mlp_ratio: float
    norm_groups: int = 32
    norm_eps: float = 1e-6
    lambda_kernel_size: int = 15
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        b, height, width, c = x.shape
        h = group_norm(self.norm_groups, self.norm_eps, self.dtype, "norm")(x)
        h = conv2d(c, 1, dtype=self.dtype, name="proj_in")(h)
        tokens = h.reshape(b, height * width, c)
        for d in range(self.level.transformer_depth):
            tokens = TransformerBlock(
                self.level, self.num_heads, self.table_side, self.context_length, self.mlp_ratio,
                self.lambda_kernel_size, dtype=self.dtype, name=f"transformer_blocks_{d}",
            )(tokens, context, (height, width), train)
        h = conv2d(c, 1, dtype=self.dtype, name="proj_out")(tokens.reshape(b, height, width, c))
        return h + x
