"""Interactive-lambda cross layer (Moebius `attn2`): a lambda layer over the 10 context tokens
with a learned global (position x context-token) table for the position lambdas.

The table has S^2 rows for the level's native side S (the size the weights were trained
at). At that size it is used untouched, so the reference's numbers are reproduced exactly;
at any other (H, W) it is resampled (see `resample_position_table`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moebius_jax.layers.batch_norm import BatchNorm
from moebius_jax.layers.linear import conv2d, dense
from moebius_jax.layers.self_lambda import apply_per_head, content_lambda


def resample_position_table(table: jnp.ndarray, side: int, hw: tuple[int, int]) -> jnp.ndarray:
    """(side^2, ...) table viewed as a side x side grid, resampled bilinearly to (H*W, ...).

    Returned untouched at the native size (H, W) = (side, side), so trained-size runs are
    bit-identical to the reference. Elsewhere the choices are those of an image resize, and why:

    * Half-pixel centres, corners not aligned: each row belongs to one latent *cell*, so the
      centres of cells covering the same part of the picture must line up. Aligning corners
      would stretch the grid by side/(side-1) and shift every interior position.
    * Antialias on, which matters only when shrinking (a resolution below the trained one):
      each new cell covers several native cells, so it gets their triangle-weighted mean.
      Plain 2-tap bilinear, shrinking k > 2 times, reads 2 of every k rows and drops the rest,
      so which learned positions count would depend on the phase of the grid and jump as the
      size changes. This is the usual rule for resizing learned position embeddings (timm,
      big_vision).
      Upsampling (the usual case: the pipeline keeps the trained short side unless told
      otherwise) is plain bilinear either way, and an axis kept at its native length is left
      exactly as it is.
    """
    height, width = hw
    if (height, width) == (side, side):
        return table
    grid = table.reshape(side, side, *table.shape[1:])
    grid = jax.image.resize(grid, (height, width, *table.shape[1:]), method="linear", antialias=True)
    return grid.reshape(height * width, *table.shape[1:])


class CrossLambda(nn.Module):
    num_heads: int = 8
    table_side: int = 64  # native latent side of this level
    context_length: int = 10
    dtype: Any = None

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, context: jnp.ndarray, hw: tuple[int, int], train: bool = False
    ) -> jnp.ndarray:
        b, n, c = x.shape
        heads = self.num_heads
        dk = dv = c // heads
        if context.shape[1] != self.context_length:
            raise ValueError(
                f"Interactive-lambda needs exactly {self.context_length} context tokens, got {context.shape[1]}"
            )
        q = conv2d(c, 1, use_bias=False, dtype=self.dtype, name="to_q")(x.reshape(b, *hw, c))
        q = BatchNorm(dtype=self.dtype, name="norm_q")(q, train).reshape(b, n, c)
        keys = dense(dk, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = dense(dv, use_bias=False, dtype=self.dtype, name="to_v")(context)
        v = BatchNorm(dtype=self.dtype, name="norm_v")(v, train)  # BatchNorm1d over (batch, tokens)

        table = self.param(
            "rel_pos_emb",
            nn.initializers.normal(1.0),
            (self.table_side**2, self.context_length, dk, 1),
            jnp.float32,
        )
        table = resample_position_table(table[..., 0], self.table_side, hw).astype(q.dtype)
        # Position lambdas contracted with q first, never building the (n, k, v) lambdas:
        # weights[n, h, m] = q[n, h, :] . R[n, m, :], a mix of the m context values per head.
        weights = jnp.sum(q.reshape(b, n, heads, 1, dk) * table[None, :, None], axis=-1, dtype=jnp.float32)
        weights = weights.astype(q.dtype)
        y = apply_per_head(q, content_lambda(keys, v), heads)
        return y + apply_per_head(weights.reshape(b, n, heads * self.context_length), v, heads)
