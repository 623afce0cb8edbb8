"""Residual additions in the activations' dtype.

The residual stream is as wide as the activations: float32 in a float32 network, bfloat16
under bfloat16 compute, where every layer already rounds its output once (float32
accumulation inside). Keeping the stream in bfloat16 halves the traffic of the tensors the
network reads most (every norm and every residual add touches them) for an error that
`tests/test_bf16.py` bounds against the unavoidable cost of rounding the weights.
"""

from __future__ import annotations

import jax.numpy as jnp


def add_residual(x: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
    """x + h in x's dtype (the stream's), whatever the branch's dtype."""
    return x + h.astype(x.dtype)
