"""Transformer block with token mixers chosen by config, and its 2-D wrapper.

One block serves every network of the UNet family: the Moebius student (Local-lambda self,
Interactive-lambda cross, Mix-FFN), the PixelHacker teacher (Gated Linear Attention self,
softmax cross, GEGLU) and any per-level mix of the choices in the tables below. Every mixer
is called with the map size (H, W) so none has to guess it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.config import LevelConfig
from moebius_jax.layers.attention import Attention
from moebius_jax.layers.cross_lambda import CrossLambda
from moebius_jax.layers.geglu import GEGLUFeedForward
from moebius_jax.layers.gla import GatedLinearAttention
from moebius_jax.layers.linear import conv2d
from moebius_jax.layers.linear_attention import LinearAttention
from moebius_jax.layers.mix_ffn import MixFFN
from moebius_jax.layers.norms import group_norm, layer_norm
from moebius_jax.layers.residual import add_residual
from moebius_jax.layers.self_lambda import SelfLambda

# Config name -> constructor of the module, given the block it sits in. The modules are named
# as in the reference's state dict: `attn1` (self), `attn2` (cross), `ff`. "none" is absent:
# the block skips that sub-layer (and its LayerNorm) altogether.
Factory = Callable[["TransformerBlock"], nn.Module]

SELF_MIXER_FACTORIES: dict[str, Factory] = {
    "local_lambda": lambda blk: SelfLambda(blk.num_heads, "local", kernel_size=blk.lambda_kernel_size,
                                           dtype=blk.dtype, name="attn1"),
    "global_lambda": lambda blk: SelfLambda(blk.num_heads, "global", table_side=blk.table_side,
                                            dtype=blk.dtype, name="attn1"),
    "attention": lambda blk: Attention(blk.num_heads, dtype=blk.dtype, name="attn1"),
    "linear_attention": lambda blk: LinearAttention(blk.num_heads, dtype=blk.dtype, name="attn1"),
    "gla": lambda blk: GatedLinearAttention(num_heads=blk.num_heads, dtype=blk.dtype, name="attn1"),
}
CROSS_MIXER_FACTORIES: dict[str, Factory] = {
    "cross_lambda": lambda blk: CrossLambda(
        blk.num_heads, blk.table_side, blk.context_length, dtype=blk.dtype, name="attn2"
    ),
    "attention": lambda blk: Attention(blk.num_heads, dtype=blk.dtype, name="attn2"),
}
# Hidden widths: Mix-FFN int(ratio * C) with the network's mix_mlp_ratio (2.5), GEGLU 4 * C,
# unless the level sets ff_mult.
FEED_FORWARD_FACTORIES: dict[str, Factory] = {
    "mix_ffn": lambda blk: MixFFN(
        int(blk.level.channels * (blk.level.ff_mult or blk.mlp_ratio)), dtype=blk.dtype, name="ff"
    ),
    "geglu": lambda blk: GEGLUFeedForward(blk.level.ff_mult or 4, dtype=blk.dtype, name="ff"),
}


class TransformerBlock(nn.Module):
    """x + self(LN x); x + cross(LN x, ctx); x + ff(LN x) — a mixer set to "none" is skipped."""

    level: LevelConfig
    num_heads: int
    table_side: int
    context_length: int
    mlp_ratio: float
    lambda_kernel_size: int = 15
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, hw: tuple[int, int], train: bool = False) -> jnp.ndarray:
        level = self.level
        if level.self_mixer != "none":
            mixer = SELF_MIXER_FACTORIES[level.self_mixer](self)
            x = add_residual(x, mixer(layer_norm(1e-5, self.dtype, "norm1")(x), hw=hw, train=train))
        if level.cross_mixer != "none":
            mixer = CROSS_MIXER_FACTORIES[level.cross_mixer](self)
            x = add_residual(x, mixer(layer_norm(1e-5, self.dtype, "norm2")(x), context, hw=hw, train=train))
        ff = FEED_FORWARD_FACTORIES[level.feed_forward](self)
        return add_residual(x, ff(layer_norm(1e-5, self.dtype, "norm3")(x), hw=hw, train=train))


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
        return add_residual(x, h)
