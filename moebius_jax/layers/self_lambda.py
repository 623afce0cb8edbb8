"""Self lambda layers (Bello 2021, "LambdaNetworks"): Moebius' Local-λ `attn1` and the
reference's global variant (`use_local_self_attn: False`).

Both share projections, normalisation and the content lambda; they differ in the position
lambdas, which are in both cases a 2-D cross-correlation run over every value channel's map:

* local (the student): `pos_conv`, an r x r kernel (r = 15) with bias, padding r // 2;
* global: `rel_pos_emb`, a (2S-1, 2S-1, d_k, 1) relative table used as the kernel, no bias,
  padding S-1, S the level's native side:
      λp[n, k, v] = Σ_m R[y_m - y_n + S - 1, x_m - x_n + S - 1, k] · V[m, v]
  The offset is key minus query (λ-networks' E_nm, the embedding of m relative to n); on maps
  larger than S x S, offsets beyond ±(S-1) contribute nothing; the table is initialised
  N(0, 1) like the cross-λ table. No released checkpoint uses this branch, so these choices are
  ours; the parameter names match the local layer's, so a Local-λ checkpoint transplants into
  everything but the table.

Shapes per level: h heads, d_k = d_v = C / h, one "u" channel. With explicit (H, W) the layer
runs on any map, square or not; nothing is inferred from sqrt(N).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from moebius_jax.layers.batch_norm import BatchNorm
from moebius_jax.layers.linear import conv2d


def content_lambda(key_logits: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
    """softmax over positions of K, transposed, times V: keys (b, m, k), values (b, m, v) -> (b, k, v).

    The keys, softmax-normalised over the m positions (or context tokens), summarise the
    values into one k x v lambda per example, which every query then multiplies.
    """
    keys = jax.nn.softmax(key_logits.astype(jnp.float32), axis=1).astype(values.dtype)
    return jnp.einsum("bmk,bmv->bkv", keys, values)


# Heads at least this wide are applied head by head; narrower ones as one block-diagonal matmul.
LANE_WIDTH = 128


def apply_per_head(x: jnp.ndarray, blocks: jnp.ndarray, heads: int) -> jnp.ndarray:
    """x (b, n, heads*p) times the same (b, p, q) block in every head -> (b, n, heads*q).

    Narrow heads (p < 128, e.g. 40 at 320 channels and 8 heads) multiply by the block-diagonal
    (heads*p, heads*q) matrix, keeping every tensor channels-last at the full width: split into
    (b, n, heads, p), the minor dimension p would be padded to 128 lanes on accelerators and
    relaid around each einsum, which costs far more traffic than the extra multiplies by zero.
    Wide heads are split, so the block-diagonal matrix (b * (heads*p)^2 elements) is never built.
    """
    b, n, _ = x.shape
    p, q = blocks.shape[1:]
    if p >= LANE_WIDTH:
        y = jnp.einsum("bnhp,bpq->bnhq", x.reshape(b, n, heads, p), blocks)
        return y.reshape(b, n, heads * q)
    eye = jnp.eye(heads, dtype=blocks.dtype)
    diagonal = jnp.einsum("hg,bpq->bhpgq", eye, blocks).reshape(b, heads * p, heads * q)
    return jnp.einsum("bnc,bcd->bnd", x, diagonal)


class SelfLambda(nn.Module):
    num_heads: int = 8
    position: str = "local"  # "local" (pos_conv) or "global" (rel_pos_emb)
    kernel_size: int = 15  # local: the position conv's side
    table_side: int = 64  # global: the level's native side S
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
        q = BatchNorm(dtype=self.dtype, name="norm_q")(q, train).reshape(b, n, c)
        v = BatchNorm(dtype=self.dtype, name="norm_v")(v, train)  # (b, H, W, dv); keys stay un-normalised
        y = apply_per_head(q, content_lambda(keys.reshape(b, n, dk), v.reshape(b, n, dv)), heads)

        # Position lambdas: the same single-input-channel kernel (d_k outputs) runs over each
        # value channel's map, so fold the value channels into the batch.
        v_maps = jnp.moveaxis(v, -1, 1).reshape(b * dv, height, width, 1)
        if self.position == "local":
            conv = conv2d(dk, self.kernel_size, padding=self.kernel_size // 2, dtype=self.dtype, name="pos_conv")
            position = conv(v_maps)
        elif self.position == "global":
            span, pad = 2 * self.table_side - 1, self.table_side - 1
            table = self.param("rel_pos_emb", nn.initializers.normal(1.0), (span, span, dk, 1), jnp.float32)
            kernel = jnp.moveaxis(table, -1, 2).astype(v_maps.dtype)  # HWIO (span, span, 1, d_k)
            position = lax.conv_general_dilated(
                v_maps, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            raise ValueError(f"self-lambda position must be 'local' or 'global', got {self.position!r}")
        position = position.reshape(b, dv, n, dk)
        y_position = jnp.einsum("bnhk,bvnk->bnhv", q.reshape(b, n, heads, dk), position)
        return y + y_position.reshape(b, n, c)
