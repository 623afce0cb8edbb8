"""Depthwise k x k convolution (one kernel per channel, stride 1, zero "same" padding), NHWC.

XLA:CPU sends `feature_group_count` convolutions to a generic grouped kernel that is 10-50x
slower than the same arithmetic written as k² shifted multiply-adds over a zero-padded map,
which XLA fuses into one vectorised loop. Other backends have fast grouped convolutions (on a
TPU, XLA counts fewer bytes for them than for the shifted form in Mix-FFN and in every
backward pass), so the form is chosen per platform when the program is lowered
(`lax.platform_dependent`), not from the host's default backend: a program lowered on a CPU
host for a TPU gets the grouped convolution. Both forms give the convolution to float32
rounding, in the forward and (by autodiff) the backward pass.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from moebius_jax.layers.linear import _accumulate_f32, torch_conv_init


def _check(x: jnp.ndarray, kernel: jnp.ndarray) -> None:
    k, channels = kernel.shape[0], x.shape[-1]
    if x.ndim != 4 or kernel.shape != (k, k, 1, channels) or k % 2 == 0:
        raise ValueError(f"depthwise_conv: expected x (B, H, W, C) and an odd (k, k, 1, C) HWIO kernel, "
                         f"got x {x.shape} and kernel {kernel.shape}")


def _grouped(x: jnp.ndarray, kernel: jnp.ndarray, preferred_element_type: Any) -> jnp.ndarray:
    pad = kernel.shape[0] // 2
    return lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1], preferred_element_type=preferred_element_type)


def _shifted(x: jnp.ndarray, kernel: jnp.ndarray, preferred_element_type: Any) -> jnp.ndarray:
    # Products of 16-bit operands are exact in float32, so accumulating in float32 gives what
    # the convolution's preferred_element_type=float32 gives, up to summation order.
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    k, (_, height, width, _) = kernel.shape[0], x.shape
    pad = k // 2
    padded = jnp.pad(x.astype(accumulate), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = kernel[:, :, 0, :].astype(accumulate)
    out = sum(padded[:, i:i + height, j:j + width, :] * taps[i, j] for i in range(k) for j in range(k))
    return out.astype(preferred_element_type or x.dtype)


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, *, preferred_element_type: Any = None) -> jnp.ndarray:
    """Cross-correlate every channel of x (B, H, W, C) with its own k x k kernel (k, k, 1, C),
    zero padding k // 2: `lax.conv_general_dilated` with `feature_group_count=C`, stride 1."""
    _check(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=lambda x, w: _shifted(x, w, preferred_element_type),
                                  default=lambda x, w: _grouped(x, w, preferred_element_type))


class DepthwiseConv(nn.Module):
    """torch.nn.Conv2d(C, C, k, padding=k // 2, groups=C) in NHWC, with the parameters (names,
    shapes, initialisers) and bfloat16 numerics of `layers.linear.conv2d(C, k, groups=C)`."""

    kernel_size: int = 3
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        kernel = self.param("kernel", torch_conv_init, (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = _accumulate_f32(depthwise_conv, self.dtype)(x, kernel)
        return y if bias is None else y + bias
