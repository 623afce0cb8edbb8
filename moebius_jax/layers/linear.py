"""Conv and dense layers with PyTorch's padding rules and default initialisation, NHWC,
and the project's mixed-precision rule.

XLA's "SAME" padding on a stride-2 conv pads only bottom/right, while torch's `padding=1`
pads both sides, so every conv takes explicit symmetric padding. Initialisers follow the
reference so that training from scratch starts where the reference starts:
conv kernels U(±1/sqrt(fan_in)) (torch's kaiming_uniform(a=√5)), linears Xavier-uniform
with zero bias.

Precision: a layer computes in its `dtype` (None: float32) — with a 16-bit dtype, operands are
rounded to it and products accumulate in float32, as accelerator matrix units do natively —
and returns the wider of `dtype` and its input's dtype (`output_dtype`). So a network's entry
decides how wide its activations are: the UNets cast their input to the compute dtype and
run lean (every activation bfloat16, half the memory traffic, which is what bounds them on
TPUs and GPUs), while the VAE, fed float32 images and latents, keeps float32 activations
between bfloat16 convolutions (its outputs are the pipeline's result, and rounding every layer
to bfloat16 costs it more accuracy than `tests/test_bf16.py` allows).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def output_dtype(x: jnp.ndarray, dtype: Any) -> jnp.dtype:
    """A layer's result dtype: the wider of its compute dtype (None: float32) and its input's."""
    return jnp.promote_types(x.dtype, dtype or jnp.float32)


def cast_weights(variables: Any, dtype: Any) -> Any:
    """`variables` with every float32 matrix of the `params` collection (kernels, embeddings,
    tables) in `dtype`; vectors (biases, norm affines) and other collections stay as they are.

    A layer would round those matrices to `dtype` anyway (see the module docstring), so this is
    exact; doing it once outside a loop that applies the network many times (the sampler)
    reads each weight as 16 bits per step instead of converting 32 bits per step.
    """
    if dtype is None or jnp.dtype(dtype).itemsize > 2:
        return variables

    def cast(x: Any) -> Any:
        return x.astype(dtype) if x.ndim >= 2 and x.dtype == jnp.float32 else x

    return {**variables, "params": jax.tree.map(cast, variables["params"])}


def accumulation_dtype(compute: Any) -> jnp.dtype:
    """What products of `compute`-typed operands are summed in: float32 for 16-bit operands
    (XLA's CPU path would otherwise accumulate in the operand type), else `compute` itself."""
    return jnp.dtype(jnp.float32) if jnp.dtype(compute).itemsize <= 2 else jnp.dtype(compute)


def promote_operands(x: jnp.ndarray, kernel: jnp.ndarray, dtype: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x and kernel in the compute dtype (None: the wider of the two)."""
    compute = dtype or jnp.promote_types(x.dtype, kernel.dtype)
    return x.astype(compute), kernel.astype(compute)


class Conv(nn.Module):
    """torch.nn.Conv2d on NHWC maps: kernel (k, k, in / groups, out), zero padding `padding`
    (depthwise filters have their own module, `layers.depthwise.DepthwiseConv`)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        kernel = self.param("kernel", torch_conv_init, (k, k, x.shape[-1] // self.groups, self.features),
                            jnp.float32)
        lhs, rhs = promote_operands(x, kernel, self.dtype)
        y = lax.conv_general_dilated(
            lhs, rhs, (self.stride, self.stride), ((self.padding, self.padding),) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
            preferred_element_type=accumulation_dtype(lhs.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y.astype(output_dtype(x, self.dtype))


class PointwiseConv(nn.Module):
    """A 1x1 convolution (torch `Conv2d(k=1)` parameters: kernel (1, 1, in, out)) applied as a
    matmul over the last axis, so it takes tokens (..., in) or maps (B, H, W, in) alike.

    XLA lowers a 1x1 `conv_general_dilated` through its convolution emitter, which on TPUs
    re-tiles the spatial axes and copies the activations in and out of that layout; a plain
    dot over the channel axis needs no copies.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", torch_conv_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        return _dense(self, x, kernel.reshape(kernel.shape[2:]))


class Dense(nn.Module):
    """torch.nn.Linear: kernel (in, out), Xavier-uniform as the reference re-initialises them."""

    features: int
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (x.shape[-1], self.features), jnp.float32)
        return _dense(self, x, kernel)


def _dense(module: PointwiseConv | Dense, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """x @ kernel over the last axis (+ the module's zero-initialised bias), precision as above."""
    lhs, rhs = promote_operands(x, kernel, module.dtype)
    y = lax.dot_general(lhs, rhs, (((x.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=accumulation_dtype(lhs.dtype))
    if module.use_bias:
        y = y + module.param("bias", nn.initializers.zeros, (module.features,), jnp.float32)
    return y.astype(output_dtype(x, module.dtype))


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
) -> nn.Module:
    """torch.nn.Conv2d equivalent (zero padding, default `padding = kernel_size // 2`).

    A 1x1, stride-1, unpadded, ungrouped conv is a `PointwiseConv` (same parameters)."""
    pad = kernel_size // 2 if padding is None else padding
    if kernel_size == 1 and stride == 1 and pad == 0 and groups == 1:
        return PointwiseConv(features, use_bias=use_bias, dtype=dtype, name=name)
    return Conv(features, kernel_size, stride, pad, groups, use_bias, dtype, name=name)


def dense(features: int, *, use_bias: bool = True, dtype: Any = None, name: str | None = None) -> Dense:
    """torch.nn.Linear equivalent, Xavier-uniform initialised as the reference re-initialises them."""
    return Dense(features, use_bias=use_bias, dtype=dtype, name=name)
