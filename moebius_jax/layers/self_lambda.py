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

The position term q · λp can be computed two ways, equal up to rounding: build the position
lambdas (a d_k x d_v matrix per position, by the convolution) and contract them with q; or,
since q · λp[n] = Σ_m (q_n · E[m - n]) V[m], take relative logits q_n · E[m - n] against a
table of E laid out by absolute key position (N x N x d_k, zero outside the window) and
multiply them into V, like attention. The first costs N · d_k · d_v per example and r² taps
per lambda entry; the second N² (h + d_k) and no taps, so it wins on small maps with wide
heads — the student's 16 x 16, 1280-channel level, where the position term takes a fifth of
the arithmetic (the layer half) and, for 8 images on a TPU, stays in on-chip memory instead of
streaming 1 GB of lambdas through HBM. `relative_logits_are_cheaper` picks per call, from the
shapes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moebius_jax.layers.batch_norm import BatchNorm
from moebius_jax.layers.linear import accumulation_dtype, conv2d, output_dtype, promote_operands, torch_conv_init


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


def relative_logits_are_cheaper(batch: int, hw: tuple[int, int], heads: int, dk: int, dv: int, taps: int) -> bool:
    """Whether `position_by_relative_logits` does at most half the multiply-adds of
    `position_by_lambdas` (`taps`: the kernel's r x r) and materialises no more: its table
    (N² d_k) and logits (batch N² h) against the lambdas (batch N d_k d_v)."""
    n = hw[0] * hw[1]
    less_work = heads * n * (dk + dv) * 2 <= dk * dv * taps
    less_memory = (n * dk + batch * heads * n) * n <= batch * n * dk * dv
    return less_work and less_memory


def position_by_lambdas(q: jnp.ndarray, v: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray | None,
                        pad: tuple[int, int], dtype: Any) -> jnp.ndarray:
    """q (b, n, h, d_k) times the position lambdas of v (b, H, W, d_v) -> (b, n, h, d_v).

    The lambdas are a 2-D cross-correlation of every value channel's map with `kernel`
    (kh, kw, d_k), zero padding `pad` (rows, columns), + `bias` (d_k): the same one-input-channel
    kernel runs over each value channel, so the value channels are folded into the batch.
    """
    b, height, width, dv = v.shape
    maps = jnp.moveaxis(v, -1, 1).reshape(b * dv, height, width, 1)
    lhs, rhs = promote_operands(maps, kernel[:, :, None, :], dtype)
    lambdas = lax.conv_general_dilated(lhs, rhs, (1, 1), ((pad[0], pad[0]), (pad[1], pad[1])),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       preferred_element_type=accumulation_dtype(lhs.dtype))
    if bias is not None:
        lambdas = lambdas + bias
    lambdas = lambdas.astype(output_dtype(maps, dtype)).reshape(b, dv, height * width, -1)
    return jnp.einsum("bnhk,bvnk->bnhv", q, lambdas)


def absolute_table(kernel: jnp.ndarray, hw: tuple[int, int], pad: tuple[int, int]) -> jnp.ndarray:
    """The (n, m, d_k) table T[n, m] = kernel[m - n + pad] (key minus query, per axis), zero where
    that offset falls outside the (kh, kw, d_k) kernel: what the padded cross-correlation
    multiplies key m's value by for query n."""
    kh, kw, dk = kernel.shape
    height, width = hw
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0)))  # index kh / kw: the zero row / column

    def offsets(size: int, taps: int, p: int) -> np.ndarray:
        d = np.arange(size)[None, :] - np.arange(size)[:, None] + p  # [query, key]
        return np.where((d >= 0) & (d < taps), d, taps)

    rows, cols = offsets(height, kh, pad[0]), offsets(width, kw, pad[1])
    table = padded[rows[:, None, :, None], cols[None, :, None, :]]  # (qy, qx, ky, kx, d_k)
    return table.reshape(height * width, height * width, dk)


def position_by_relative_logits(q: jnp.ndarray, v: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray | None,
                                pad: tuple[int, int], dtype: Any) -> jnp.ndarray:
    """`position_by_lambdas` computed as attention: logits q_n · T[n, m] (`absolute_table`),
    times V, plus q_n · bias for every value channel (the bias is added to every lambda entry).

    The logits stay float32 and multiply V at full precision: rounded to 16 bits before the
    sum over keys, which cancels, they cost about twice the accuracy that rounding the lambdas
    costs the other form (measured on the tiny student); this small matmul is cheap either way.
    """
    b, height, width, dv = v.shape
    compute = dtype or jnp.promote_types(q.dtype, kernel.dtype)
    table = absolute_table(kernel.astype(compute), (height, width), pad)
    logits = jnp.einsum("bnhk,nmk->bnhm", q.astype(compute), table, preferred_element_type=jnp.float32)
    values = v.reshape(b, height * width, dv).astype(jnp.float32)
    y = jnp.einsum("bnhm,bmv->bnhv", logits, values, precision=lax.Precision.HIGHEST)
    if bias is not None:
        y = y + jnp.einsum("bnhk,k->bnh", q.astype(jnp.float32), bias, precision=lax.Precision.HIGHEST)[..., None]
    return y.astype(q.dtype)


class PositionConvWeights(nn.Module):
    """The parameters of the Local-λ position convolution (torch's `Conv2d(1, d_k, r)`: kernel
    (r, r, 1, d_k), bias (d_k,)), which `SelfLambda` applies in either form."""

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        r = self.kernel_size
        kernel = self.param("kernel", torch_conv_init, (r, r, 1, self.features), jnp.float32)
        return kernel[:, :, 0, :], self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


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

        if self.position == "local":
            kernel, bias = PositionConvWeights(dk, self.kernel_size, name="pos_conv")()
            pad = self.kernel_size // 2
        elif self.position == "global":
            span, pad = 2 * self.table_side - 1, self.table_side - 1
            table = self.param("rel_pos_emb", nn.initializers.normal(1.0), (span, span, dk, 1), jnp.float32)
            kernel, bias = table[..., 0], None
        else:
            raise ValueError(f"self-lambda position must be 'local' or 'global', got {self.position!r}")
        cheaper = relative_logits_are_cheaper(b, hw, heads, dk, dv, kernel.shape[0] * kernel.shape[1])
        position = position_by_relative_logits if cheaper else position_by_lambdas
        y_position = position(q.reshape(b, n, heads, dk), v, kernel, bias, (pad, pad), self.dtype)
        return y + y_position.reshape(b, n, c)
