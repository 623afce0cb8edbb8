"""Conv and dense layers with PyTorch's padding rules and default initialisation, NHWC.

XLA's "SAME" padding on a stride-2 conv pads only bottom/right, while torch's `padding=1`
pads both sides, so every conv takes explicit symmetric padding. Initialisers follow the
reference so that training from scratch starts where the reference starts:
conv kernels U(±1/sqrt(fan_in)) (torch's kaiming_uniform(a=√5)), linears Xavier-uniform
with zero bias.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _accumulate_f32(op: Any, dtype: Any) -> Any:
    """With 16-bit compute, convs and matmuls take 16-bit inputs but accumulate and return
    float32: rounding every layer's output to 8 mantissa bits would compound to several
    percent over the UNet; rounding only the operands keeps it near bfloat16's own precision."""
    if dtype is None or jnp.dtype(dtype).itemsize > 2:
        return op
    return functools.partial(op, preferred_element_type=jnp.float32)


def conv2d(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = True,
    dtype: Any = None,
    name: str | None = None,
) -> nn.Conv:
    """torch.nn.Conv2d equivalent (zero padding, default `padding = kernel_size // 2`)."""
    pad = kernel_size // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=torch_conv_init,
        conv_general_dilated=_accumulate_f32(jax.lax.conv_general_dilated, dtype),
        name=name,
    )


def dense(features: int, *, use_bias: bool = True, dtype: Any = None, name: str | None = None) -> nn.Dense:
    """torch.nn.Linear equivalent, Xavier-uniform initialised as the reference re-initialises them."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        dot_general=_accumulate_f32(jax.lax.dot_general, dtype),
        name=name,
    )
