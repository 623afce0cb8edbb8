"""The depthwise convolution equals XLA's grouped convolution (forward and both gradients, float32
and bfloat16 operands), keeps `conv2d`'s parameters, and is never a grouped convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from moebius_jax.layers.depthwise import DepthwiseConv, depthwise_conv
from moebius_jax.layers.linear import conv2d

from conftest import assert_parity


def grouped_conv(x, kernel, preferred_element_type=None):
    pad = kernel.shape[0] // 2
    return lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
                                    preferred_element_type=preferred_element_type)


def _inputs(kernel_size: int, dtype=jnp.float32):
    rng = np.random.default_rng(kernel_size)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 12)), dtype)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 1, 12)), dtype)
    return x, kernel


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_forward_and_gradients_equal_the_grouped_convolution(kernel_size):
    x, kernel = _inputs(kernel_size)
    ours, ours_vjp = jax.vjp(jax.jit(depthwise_conv), x, kernel)
    ref, ref_vjp = jax.vjp(grouped_conv, x, kernel)
    assert_parity(ours, ref, rel=1e-6, name="forward")
    cotangent = jnp.asarray(np.random.default_rng(0).standard_normal(ref.shape), jnp.float32)
    for name, g, g_ref in zip(("d/dx", "d/dkernel"), ours_vjp(cotangent), ref_vjp(cotangent)):
        assert_parity(g, g_ref, rel=1e-6, name=name)


def test_bfloat16_operands_accumulate_in_float32():
    x, kernel = _inputs(3, jnp.bfloat16)
    ours = jax.jit(lambda x, k: depthwise_conv(x, k, jnp.float32))(x, kernel)
    assert ours.dtype == jnp.float32
    assert_parity(ours, grouped_conv(x, kernel, jnp.float32), rel=1e-6)
    # Without an accumulation type the result has the operands' type, like the convolution's.
    assert depthwise_conv(x, kernel).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("use_bias", [False, True])
def test_module_matches_conv2d_parameters_and_output(dtype, use_bias):
    x, _ = _inputs(3)
    ours, ref = DepthwiseConv(3, use_bias=use_bias, dtype=dtype), conv2d(12, 3, groups=12, use_bias=use_bias,
                                                                           dtype=dtype)
    variables = ours.init(jax.random.key(0), x)
    ref_variables = ref.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, ref_variables)
    jax.tree.map(np.testing.assert_array_equal, variables, ref_variables)  # same names and initial values
    if use_bias:  # a non-zero bias, to see it added
        variables = jax.tree.map(lambda p: p + 0.5, variables)
    out, ref_out = ours.apply(variables, x), ref.apply(variables, x)
    assert out.dtype == ref_out.dtype
    assert_parity(out, ref_out, rel=1e-6)


@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_no_platform_lowers_a_grouped_convolution(platform):
    """The shifted form on every platform, forward and backward, whatever backend the lowering
    host has (grouped convolutions are the slow path on CPU and TPU)."""
    x, kernel = _inputs(3)
    step = jax.grad(lambda x, k: jnp.sum(depthwise_conv(x, k) ** 2), argnums=(0, 1))
    text = jax.jit(step).trace(x, kernel).lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.convolution" not in text
    assert "stablehlo.add" in text


def test_bad_shapes_are_named():
    x, kernel = _inputs(3)
    with pytest.raises(ValueError, match=r"odd \(k, k, 1, C\).*kernel \(3, 3, 2, 12\)"):
        depthwise_conv(x, jnp.zeros((3, 3, 2, 12)))
    with pytest.raises(ValueError, match=r"kernel \(2, 2, 1, 12\)"):
        depthwise_conv(x, jnp.zeros((2, 2, 1, 12)))
