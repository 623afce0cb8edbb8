"""Multi-head softmax attention (diffusers `Attention`): the teacher's cross-attention and
the VAE's mid-block self-attention."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moebius_jax.layers.linear import dense


class Attention(nn.Module):
    """Scaled dot-product attention over `context` (self-attention when context is None)."""

    num_heads: int = 8
    qkv_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        context: jnp.ndarray | None = None,
        hw: tuple[int, int] | None = None,
        train: bool = False,
    ) -> jnp.ndarray:
        del hw, train
        b, n, c = x.shape
        context = x if context is None else context
        heads, head_dim = self.num_heads, c // self.num_heads
        q = dense(c, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = dense(c, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)
        v = dense(c, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
        split = lambda t: t.reshape(b, t.shape[1], heads, head_dim)  # noqa: E731
        out = jax.nn.dot_product_attention(split(q), split(k), split(v))
        return dense(c, dtype=self.dtype, name="to_out")(out.reshape(b, n, c))
