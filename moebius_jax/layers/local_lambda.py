"""Local-lambda self layer (Moebius `attn1`): a lambda layer whose position lambdas come
from a 15x15 convolution over the value map (Bello 2021, "LambdaNetworks", local variant).

Shapes per level: h heads, d_k = d_v = C / h, one "u" channel. With explicit (H, W) the
layer runs on any map, square or not; nothing is inferred from sqrt(N).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moebius_jax.layers.batch_norm import BatchNorm
from moebius_jax.layers.linear import conv2d


class LocalLambda(nn.Module):
    num_heads: int = 8
    kernel_size: int = 15
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, hw: tuple[int, int], train: bool = False) -> jnp.ndarray:
        b, n, c = x.shape
        height, width = hw
        heads = self.num_heads
        dk = dv = c // heads
        fmap = x.reshape(b, height, width, c)

        q = conv2d(c, 1, use_bias=False, dtype=self.dtype, name="to_q")(fmap)
        keys = conv2d(dk, 1, use_bias=False, dtype=self.dtype, name="to_k")(fmap)
        v = conv2d(dv, 1, use_bias=False, dtype=self.dtype, name="to_v")(fmap)
        q = BatchNorm(dtype=self.dtype, name="norm_q")(q, train).reshape(b, n, heads, dk)
        v = BatchNorm(dtype=self.dtype, name="norm_v")(v, train)  # (b, H, W, dv); keys stay un-normalised

        # Content lambda: keys softmax-normalised over positions summarise the values.
        keys = jax.nn.softmax(keys.reshape(b, n, dk).astype(jnp.float32), axis=1).astype(v.dtype)
        content = jnp.einsum("bnk,bnv->bkv", keys, v.reshape(b, n, dv))
        y = jnp.einsum("bnhk,bkv->bnhv", q, content)

        # Position lambdas: the same single-channel conv (d_k outputs) runs over each value
        # channel's map, so fold the value channels into the batch.
        v_maps = jnp.moveaxis(v, -1, 1).reshape(b * dv, height, width, 1)
        pad = self.kernel_size // 2
        position = conv2d(dk, self.kernel_size, padding=pad, dtype=self.dtype, name="pos_conv")(v_maps)
        position = position.reshape(b, dv, n, dk)
        y = y + jnp.einsum("bnhk,bvnk->bnhv", q, position)
        return y.reshape(b, n, heads * dv)
