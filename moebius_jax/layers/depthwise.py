"""Depthwise k x k convolution (one filter per channel, stride 1) as k*k shifted multiply-adds.

XLA's grouped-convolution path is the slow one for depthwise filters on every backend we
compile for: XLA:CPU sends `feature_group_count` convolutions to a kernel 10-50x slower than
the same arithmetic written out, and XLA:TPU re-tiles the map into overlapping strips with
layout copies on both sides (8x the memory traffic of reading the padded input once and
writing the result, for a 3x3 filter on 2x64x64x1600). Written as a sum of shifted slices of
the zero-padded input, the whole filter is one elementwise fusion on both.
"""

from __future__ import annotations

import jax.numpy as jnp


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, padding: int, accumulate: jnp.dtype) -> jnp.ndarray:
    """x (B, H, W, C) correlated with kernel (k, k, C), zero padding `padding` on every side.

    Products and the running sum are in `accumulate` (float32 for 16-bit operands); the result
    stays in `accumulate` for the caller to add its bias and round.
    """
    k = kernel.shape[0]
    height = x.shape[1] + 2 * padding - k + 1
    width = x.shape[2] + 2 * padding - k + 1
    # Pad in the input's dtype and widen each slice: XLA then fuses padding, slicing and the
    # sum into one pass over x (a widened padded copy would be written out and re-read k*k times).
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kernel = kernel.astype(accumulate)
    out = None
    for dy in range(k):
        for dx in range(k):
            term = padded[:, dy:dy + height, dx:dx + width].astype(accumulate) * kernel[dy, dx]
            out = term if out is None else out + term
    return out
