"""Transformer block with token mixers chosen by config, and its 2-D wrapper.

One block serves every network of the UNet family: the Moebius student (Local-lambda self,
Interactive-lambda cross, Mix-FFN), the PixelHacker teacher (Gated Linear Attention self,
softmax cross, GEGLU) and any per-level mix of the registered choices
(`moebius_jax.layers.mixers`). Every mixer is called with the map size (H, W) so none has
to guess it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.config import LevelConfig, UNetConfig
from moebius_jax.layers.linear import conv2d
from moebius_jax.layers.mixers import SLOTS, build_mixer
from moebius_jax.layers.norms import group_norm, layer_norm
from moebius_jax.layers.residual import add_residual


class TransformerBlock(nn.Module):
    """x + self(LN x); x + cross(LN x, ctx); x + ff(LN x) — a mixer set to "none" is skipped
    with its LayerNorm. `native_side`: the level's latent side at the trained resolution."""

    network: UNetConfig
    level: LevelConfig
    native_side: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, hw: tuple[int, int], train: bool = False) -> jnp.ndarray:
        def sublayer(slot: str) -> Callable[..., jnp.ndarray] | None:
            """The slot's module after its LayerNorm, or None for "none"."""
            mixer = build_mixer(slot, self.network, self.level, self.native_side, self.dtype)
            if mixer is None:
                return None
            norm = layer_norm(1e-5, self.dtype, SLOTS[slot].norm)
            return lambda h, *ctx: mixer(norm(h), *ctx, hw=hw, train=train)

        if (self_mixer := sublayer("self_mixer")) is not None:
            x = add_residual(x, self_mixer(x))
        if (cross_mixer := sublayer("cross_mixer")) is not None:
            x = add_residual(x, cross_mixer(x, context))
        return add_residual(x, sublayer("feed_forward")(x))


class Transformer2D(nn.Module):
    """GroupNorm -> 1x1 proj_in -> transformer blocks over raster-ordered tokens -> 1x1 proj_out, + input."""

    network: UNetConfig
    level: LevelConfig
    native_side: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        b, height, width, c = x.shape
        net = self.network
        h = group_norm(net.norm_num_groups, net.transformer_norm_eps, self.dtype, "norm")(x)
        h = conv2d(c, 1, dtype=self.dtype, name="proj_in")(h)
        tokens = h.reshape(b, height * width, c)
        for d in range(self.level.transformer_depth):
            tokens = TransformerBlock(
                net, self.level, self.native_side, dtype=self.dtype, name=f"transformer_blocks_{d}"
            )(tokens, context, (height, width), train)
        h = conv2d(c, 1, dtype=self.dtype, name="proj_out")(tokens.reshape(b, height, width, c))
        return add_residual(x, h)
