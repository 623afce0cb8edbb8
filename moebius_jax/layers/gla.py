"""Gated Linear Attention (the PixelHacker teacher's self-attention), in pure JAX.

The reference runs fla's Triton kernels; here the same recurrence is evaluated with plain
`lax.scan` + matmuls so it runs on CPU, GPU and TPU. Per batch element and head, with a
K x V state S and a per-token, per-key-channel log-decay gk <= 0:

    S_0 = 0;  S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t;  o_t = (q_t * scale) S_t

`gla_recurrent` is that definition token by token (the test oracle); `gla_chunked` is the
production form. Tokens are (B, N, H, D) throughout, so NHWC feature maps only need a reshape.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Everything inside the recurrence is float32 at full matmul precision (TPU/GPU defaults
# would otherwise drop to bf16/TF32 passes, far outside the 1e-4 parity budget).
_HI = lax.Precision.HIGHEST
_MAX_SUB_CHUNK = 16


def _einsum(spec: str, *operands: Array) -> Array:
    """float32 einsum at full precision (the recurrence's only matmul)."""
    return jnp.einsum(spec, *operands, precision=_HI, preferred_element_type=jnp.float32)


def gla_recurrent(q: Array, k: Array, v: Array, gk: Array, scale: float) -> Array:
    """Token-by-token GLA recurrence (the definition; slow, used as the oracle).

    q, k, gk: (B, N, H, K); v: (B, N, H, V); returns o: (B, N, H, V) in float32.
    """
    q, k, v, gk = (a.astype(jnp.float32) for a in (q, k, v, gk))
    b, _, h, dk = q.shape
    dv = v.shape[-1]

    def step(state: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
        q_t, k_t, v_t, g_t = xs  # (B, H, K) / (B, H, V)
        state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, _einsum("bhk,bhkv->bhv", q_t * scale, state)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, gk))
    _, o = lax.scan(step, jnp.zeros((b, h, dk, dv), jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1)


def _sub_chunk_size(chunk_size: int) -> int:
    """Largest divisor of chunk_size that is <= 16 (the exact pairwise block size)."""
    return max(d for d in range(1, min(chunk_size, _MAX_SUB_CHUNK) + 1) if chunk_size % d == 0)


def _suffix_exclusive_sum(x: Array, axis: int) -> Array:
    """sum_{m > j} x_m along `axis`, summed directly (not as total minus prefix: no cancellation)."""
    inclusive = jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)
    shifted = lax.slice_in_dim(inclusive, 1, x.shape[axis], axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 1)
    return jnp.pad(shifted, pad)


def _chunk_step(state: Array, chunk: tuple[Array, Array, Array, Array], sub: int) -> tuple[Array, Array]:
    """One chunk of length L: outputs (B, H, L, V) and the state after the chunk.

    Every decay factor is exp(segment sum of gk) over a segment, and every segment sum is
    formed directly from same-sign terms — never as a difference of two cumulative sums —
    so each exponent is <= 0 (no overflow for any gk) and accurate to a few ulps of itself.
    """
    q, k, v, g = chunk  # q pre-scaled; (B, H, L, K) except v (B, H, L, V)
    bsz, heads, length, dk = q.shape
    n = length // sub

    # Inter-chunk: the carried state decays by the in-chunk prefix sum up to and including t.
    prefix = jnp.cumsum(g, axis=2)
    o = _einsum("bhlk,bhkv->bhlv", q * jnp.exp(prefix), state)
    decay_to_end = jnp.exp(_suffix_exclusive_sum(g, axis=2))
    new_state = jnp.exp(prefix[:, :, -1, :])[..., None] * state + _einsum(
        "bhlk,bhlv->bhkv", k * decay_to_end, v
    )

    # Intra-chunk, split into n sub-chunks of size `sub`. For i in sub-chunk I > J ∋ j:
    #   b_i - b_j = [sum of g over I up to i] + [totals of sub-chunks strictly between]
    #             + [sum of g over J after j],
    # each part <= 0, so exp factorises into a q-side factor and a k-side factor, both <= 1.
    gs = g.reshape(bsz, heads, n, sub, dk)
    qs = q.reshape(bsz, heads, n, sub, dk)
    ks = k.reshape(bsz, heads, n, sub, dk)
    local_prefix = jnp.cumsum(gs, axis=3)  # (B, H, n, s, K)
    totals = local_prefix[:, :, :, -1, :]  # (B, H, n, K)
    blocks = jnp.arange(n)
    i_blk, j_blk, m_blk = blocks[:, None, None], blocks[None, :, None], blocks[None, None, :]
    between = (j_blk < m_blk) & (m_blk < i_blk)  # [I, J, M]: sub-chunk M lies strictly between
    gap = _einsum("IJM,bhMk->bhIJk", between.astype(jnp.float32), totals)  # (B, H, I, J, K)
    q_side = qs[:, :, :, None] * jnp.exp(local_prefix[:, :, :, None] + gap[:, :, :, :, None])
    k_side = ks * jnp.exp(_suffix_exclusive_sum(gs, axis=3))
    a_off = _einsum("bhIJik,bhJjk->bhIiJj", q_side, k_side)

    # Diagonal sub-blocks: exact pairwise exp(sum_{j < m <= i} g_m) as a masked matmul; the
    # (B, H, n, s, s, K) tensor is L·s·K per (batch, head) (and q_side above L·n·K), against
    # L·L·K for all pairs: 4x and 16x smaller at L=64, s=16.
    pos = jnp.arange(sub)
    segment = (pos[None, :, None] < pos[None, None, :]) & (pos[None, None, :] <= pos[:, None, None])
    pair_log_decay = _einsum("ijm,bhnmk->bhnijk", segment.astype(jnp.float32), gs)
    a_diag = _einsum("bhnik,bhnjk,bhnijk->bhnij", qs, ks, jnp.exp(pair_log_decay))

    # Assemble the (L, L) causal score matrix. The non-causal entries being masked here were
    # also built from exponents <= 0 (empty segments sum to 0), so masking never meets inf/NaN.
    causal = jnp.tril(jnp.ones((sub, sub), jnp.float32))
    strictly_before = (blocks[None, :] < blocks[:, None]).astype(jnp.float32)[:, None, :, None]
    on_diagonal = jnp.eye(n, dtype=jnp.float32)[:, None, :, None]
    scores = a_off * strictly_before + (a_diag * causal)[:, :, :, :, None, :] * on_diagonal
    o = o + _einsum("bhij,bhjv->bhiv", scores.reshape(bsz, heads, length, length), v)
    return new_state, o


def gla_chunked(q: Array, k: Array, v: Array, gk: Array, scale: float, chunk_size: int = 64) -> Array:
    """Chunked GLA: scan over chunks carrying the (B, H, K, V) state, matmuls inside a chunk.

    Same inputs/outputs as `gla_recurrent`; any sequence length (padded up to a chunk multiple).
    Requires gk <= 0 (log-decays, as logsigmoid produces): all exponents are then <= 0.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    q, k, v, gk = (a.astype(jnp.float32) for a in (q, k, v, gk))
    bsz, length, heads, dk = q.shape
    dv = v.shape[-1]
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length

    def to_chunks(a: Array) -> Array:
        # Padding goes after the last real token with q = k = v = 0 and gk = 0 (decay 1, so no
        # exp overflow). Causality means token t only reads tokens <= t, all real, so padded
        # positions cannot reach real outputs; their own outputs and the final state are dropped.
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
        a = a.reshape(bsz, n_chunks, chunk_size, heads, a.shape[-1])
        return a.transpose(1, 0, 3, 2, 4)  # (n_chunks, B, H, L, D)

    xs = tuple(to_chunks(a) for a in (q * scale, k, v, gk))
    sub = _sub_chunk_size(chunk_size)
    _, o = lax.scan(
        lambda s, c: _chunk_step(s, c, sub), jnp.zeros((bsz, heads, dk, dv), jnp.float32), xs
    )
    o = o.transpose(1, 0, 3, 2, 4).reshape(bsz, n_chunks * chunk_size, heads, dv)
    return o[:, :length]


class RMSNormSwishGate(nn.Module):
    """Per-head RMSNorm of the GLA output times swish(g) (fla's fused norm-gate), in float32."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, o: Array, g: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (o.shape[-1],), self.param_dtype)
        o = o.astype(jnp.float32)
        g = g.astype(jnp.float32)
        o = o * lax.rsqrt(jnp.mean(jnp.square(o), axis=-1, keepdims=True) + self.eps)
        return o * scale.astype(jnp.float32) * g * jax.nn.sigmoid(g)


class GatedLinearAttention(nn.Module):
    """fla `GatedLinearAttention` as configured by PixelHacker, on (B, N, C) tokens.

    Parameter names mirror the torch state dict (`gk_proj.0` -> `gk_proj_0`,
    `g_norm_swish_gate.weight` -> `g_norm_swish_gate/scale`). Intermediates are sown into the
    `intermediates` collection for layer-by-layer checks.
    """

    num_heads: int = 8
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    norm_eps: float = 1e-6
    chunk_size: int = 64
    dtype: Any = None  # projections' computation dtype; recurrence and norm-gate stay float32
    param_dtype: Any = jnp.float32
    precision: Any = None  # projections' matmul precision (HIGHEST for tight parity on GPU/TPU)

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int] | None = None, train: bool = False) -> Array:
        del hw, train  # part of the token-mixer interface; GLA needs neither
        bsz, length, channels = x.shape
        key_dim = int(channels * self.expand_k)
        value_dim = int(channels * self.expand_v)
        if key_dim % self.num_heads or value_dim % self.num_heads:
            raise ValueError(
                f"key dim {key_dim} / value dim {value_dim} not divisible by {self.num_heads} heads"
            )
        head_k = key_dim // self.num_heads
        head_v = value_dim // self.num_heads

        def dense(features: int, name: str, use_bias: bool = False) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                name=name,
            )

        def heads(a: Array, dim: int) -> Array:
            return a.reshape(bsz, length, self.num_heads, dim)  # head-major: f = h * dim + d

        q = heads(dense(key_dim, "q_proj")(x), head_k)
        k = heads(dense(key_dim, "k_proj")(x), head_k)
        v = heads(dense(value_dim, "v_proj")(x), head_v)
        low_rank = dense(self.gate_low_rank_dim, "gk_proj_0")(x)
        gk_logits = heads(dense(key_dim, "gk_proj_1", use_bias=True)(low_rank), head_k)
        gk = jax.nn.log_sigmoid(gk_logits.astype(jnp.float32)) / self.gate_logit_normalizer
        o_core = gla_chunked(q, k, v, gk, head_k**-0.5, self.chunk_size)
        g = heads(dense(value_dim, "g_proj")(x), head_v)
        norm_gate = RMSNormSwishGate(self.norm_eps, self.param_dtype, name="g_norm_swish_gate")
        o_gated = norm_gate(o_core, g).reshape(bsz, length, value_dim)
        out = dense(channels, "o_proj")(o_gated.astype(self.dtype or o_gated.dtype))

        sown = dict(q=q, k=k, v=v, gk_logits=gk_logits, gk=gk, o_core=o_core, g=g, o_gated=o_gated)
        for name, value in sown.items():
            self.sow("intermediates", name, value)
        return out
