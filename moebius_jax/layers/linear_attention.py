"""Non-causal multi-head linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax attention's exp(q·k) is replaced by a positive feature map φ(x) = elu(x) + 1, so the
sum over keys can be taken once for all queries. Per head, with tokens n (queries) and m (keys):

    out_n = φ(q_n)ᵀ (Σ_m φ(k_m) v_mᵀ) / (φ(q_n)ᵀ Σ_m φ(k_m) + eps)

O(N·d²) instead of O(N²·d): no (N, N) score matrix at any resolution. Projections are
named and shaped like the softmax `Attention` (`to_q`, `to_k`, `to_v` without bias,
`to_out` with bias), so weights transplant between the two.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moebius_jax.layers.linear import dense


def elu_feature_map(x: jnp.ndarray) -> jnp.ndarray:
    """φ(x) = elu(x) + 1 > 0: keeps every kernel value φ(q)·φ(k) positive, as softmax's is."""
    return jax.nn.elu(x) + 1.0


class LinearAttention(nn.Module):
    """Self-attention over (B, N, C) tokens with the elu+1 kernel; the map size is not needed."""

    num_heads: int = 8
    eps: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, hw: tuple[int, int] | None = None, train: bool = False) -> jnp.ndarray:
        del hw, train  # part of the token-mixer interface; the kernel sums need neither
        b, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads

        def split(name: str) -> jnp.ndarray:
            # The key sums run over up to 4096 tokens: keep them in float32 whatever the compute dtype.
            t = dense(c, use_bias=False, dtype=self.dtype, name=name)(x)
            return t.reshape(b, n, heads, head_dim).astype(jnp.float32)

        q, k, v = elu_feature_map(split("to_q")), elu_feature_map(split("to_k")), split("to_v")
        kv = jnp.einsum("bmhk,bmhv->bhkv", k, v)
        numerator = jnp.einsum("bnhk,bhkv->bnhv", q, kv)
        denominator = jnp.einsum("bnhk,bhk->bnh", q, k.sum(axis=1)) + self.eps
        out = (numerator / denominator[..., None]).reshape(b, n, c).astype(self.dtype or x.dtype)
        return dense(c, dtype=self.dtype, name="to_out")(out)
