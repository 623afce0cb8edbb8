"""bfloat16 compute (float32 master weights, float32 accumulation) against float32.

The issue's goal was bf16 within 1e-2 of float32 on the tiny fixtures. Measured, that is out
of reach for any bf16 scheme there: the fixtures' random-weight networks amplify weight
noise ~15x, so merely rounding the *weights* to bf16 and computing in float32 already moves
the student's output by 2.4e-2 of its max (2.0e-2 in norm). What our bf16 path controls is
what it adds on top (rounding the activations fed to each conv and matmul), so that is what
is tested: its error stays within 2x the unavoidable weight-rounding error (measured 1.3x for
the student, 1.6x for the VAE encoder).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import fixture_path, load_npz, nchw_to_nhwc

import moebius_jax
from moebius_jax.vae_loading import load_vae


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _rounded(variables):
    return {**variables, "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                                                variables["params"])}


def test_student_bf16_adds_little_to_weight_rounding():
    io = load_npz("moebius_tiny", "io.npz")
    args = (nchw_to_nhwc(io["sample"]), io["timesteps"], io["input_ids"])
    config, weights = fixture_path("moebius_tiny", "config.yaml"), fixture_path("moebius_tiny", "diffusion_pytorch_model.bin")
    model32, variables = moebius_jax.load_model(config, weights)
    model16, _ = moebius_jax.load_model(config, weights, dtype=jnp.bfloat16)
    f32 = jax.jit(model32.apply)
    exact = f32(variables, *args).sample
    floor = _rel(f32(_rounded(variables), *args).sample, exact)
    out16 = jax.jit(model16.apply)(variables, *args).sample
    assert _rel(out16, exact) <= 2 * floor, (_rel(out16, exact), floor)


def test_vae_bf16_adds_little_to_weight_rounding():
    io = load_npz("vae_tiny", "io.npz")
    vae32, variables = load_vae(fixture_path("vae_tiny"))
    vae16, _ = load_vae(fixture_path("vae_tiny"), dtype=jnp.bfloat16)
    for method, x in (("encode", nchw_to_nhwc(io["image"])), ("decode", nchw_to_nhwc(io["latent_in"]))):
        f32 = jax.jit(lambda v, x: jax.tree.leaves(vae32.apply(v, x, method=method))[0])
        f16 = jax.jit(lambda v, x: jax.tree.leaves(vae16.apply(v, x, method=method))[0])
        exact = f32(variables, x)
        floor = _rel(f32(_rounded(variables), x), exact)
        assert _rel(f16(variables, x), exact) <= 2 * floor, (method, _rel(f16(variables, x), exact), floor)
