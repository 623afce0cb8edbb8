"""bfloat16 compute (float32 master weights, float32 accumulation) against float32.

The issue's goal was bf16 within 1e-2 of float32 on the tiny fixtures. Measured, that is out
of reach for any bf16 scheme there: the fixtures' random-weight networks amplify weight
noise ~15x, so merely rounding the *weights* to bf16 and computing in float32 already moves
the student's output by 2.4e-2 of its max (2.0e-2 in norm). What our bf16 path controls is
what it adds on top (rounding the activations fed to each conv and matmul), so that is what
is tested: its error stays within 2x the unavoidable weight-rounding error (measured 1.6x for
the student — 1.4x before its smallest level's Local-λ switched to relative logits — and 1.6x
for the VAE encoder).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from conftest import TINY_STUDENT_CONFIG, TINY_STUDENT_WEIGHTS, TINY_VAE, load_npz, nchw_to_nhwc

import moebius_jax
from moebius_jax.vae_loading import load_vae


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _rounded(variables):
    """The weights rounded to bfloat16 (nearest even) and held in float32; on the host, so that
    no per-shape conversion programs are compiled."""
    round_trip = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    return {**variables, "params": jax.tree.map(round_trip, variables["params"])}


def test_student_bf16_adds_little_to_weight_rounding(tiny_student, tiny_student_apply):
    io = load_npz("moebius_tiny", "io.npz")
    args = (nchw_to_nhwc(io["sample"]), io["timesteps"], io["input_ids"])
    _, variables = tiny_student
    model16, _ = moebius_jax.load_model(TINY_STUDENT_CONFIG, TINY_STUDENT_WEIGHTS, dtype=jnp.bfloat16)
    exact = tiny_student_apply(variables, *args).sample
    floor = _rel(tiny_student_apply(_rounded(variables), *args).sample, exact)
    out16 = jax.jit(model16.apply)(variables, *args).sample
    assert _rel(out16, exact) <= 2 * floor, (_rel(out16, exact), floor)


def test_vae_bf16_adds_little_to_weight_rounding(tiny_vae):
    io = load_npz("vae_tiny", "io.npz")
    vae32, variables = tiny_vae
    vae16, _ = load_vae(TINY_VAE, dtype=jnp.bfloat16)
    for method, x in (("encode", nchw_to_nhwc(io["image"])), ("decode", nchw_to_nhwc(io["latent_in"]))):
        f32 = jax.jit(lambda v, x: jax.tree.leaves(vae32.apply(v, x, method=method))[0])
        f16 = jax.jit(lambda v, x: jax.tree.leaves(vae16.apply(v, x, method=method))[0])
        exact = f32(variables, x)
        floor = _rel(f32(_rounded(variables), x), exact)
        assert _rel(f16(variables, x), exact) <= 2 * floor, (method, _rel(f16(variables, x), exact), floor)
