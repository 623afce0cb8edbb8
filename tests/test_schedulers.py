"""Scheduler parity against the reference's DDIM/DDPM schedulers (schedulers.npz), the DDIM step
under jit/scan/vmap, and the statistics of the training timestep sampler."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity, load_npz, nchw_to_nhwc

from moebius_jax.schedulers import (
    add_noise,
    ddim_step,
    ddim_step_ratio,
    ddim_timesteps,
    pred_original_sample,
    sample_timesteps,
    scaled_linear_schedule,
)

# Not bit-identical, for two measured reasons: the reference's float32 sqrt (torch 2.13 CPU) is not
# correctly rounded (~20% of inputs come out 1 ulp off, e.g. sqrt(ᾱ_500)), and XLA turns division by
# a broadcast scalar into multiplication by its reciprocal. Both stay within ~3e-7 of max|ref|;
# 1e-6 of max|ref| is a few ulps of the largest value.
REL = 1e-6
STEP_COUNTS = (20, 10, 50)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return load_npz("schedulers.npz")


@pytest.fixture(scope="module")
def sched():
    return scaled_linear_schedule()


def test_schedule_tables_bit_identical(ref, sched):
    assert sched.num_train_timesteps == 1000
    for name in ("betas", "alphas_cumprod", "final_alpha_cumprod"):
        ours = getattr(sched, name)
        assert ours.dtype == np.float32 and ours.shape == ref[name].shape, name
        np.testing.assert_array_equal(ours, ref[name], err_msg=name)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_ddim_timesteps(ref, n):
    np.testing.assert_array_equal(ddim_timesteps(n), ref[f"ddim_n{n}_timesteps"])
    cut = ddim_timesteps(n, strength=0.99)
    np.testing.assert_array_equal(cut, ref[f"ddim_n{n}_pipeline_timesteps_strength0.99"])
    assert len(cut) == int(ref[f"ddim_n{n}_pipeline_num_inference_steps"])
    # The step gap stays that of the uncut schedule (19 steps of 50 for n = 20, ending at 0).
    assert ddim_step_ratio(n) == 1000 // n
    np.testing.assert_array_equal(np.diff(cut), -ddim_step_ratio(n))


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("case", range(4))
def test_ddim_step_matches_reference(ref, sched, n, case):
    key = f"ddim_n{n}_step"
    t = ref[f"{key}_t"][case]
    model_output = nchw_to_nhwc(ref[f"{key}_model_output"][case])
    sample = nchw_to_nhwc(ref[f"{key}_sample"][case])
    # The pipeline passes t as a 1-element tensor.
    prev, x0 = ddim_step(
        sched.alphas_cumprod, sched.final_alpha_cumprod, model_output, np.array([t]), sample,
        ddim_step_ratio(n),
    )
    assert prev.dtype == jnp.float32 and x0.dtype == jnp.float32
    assert_parity(prev, nchw_to_nhwc(ref[f"{key}_prev_sample"][case]), REL, f"{key}[{case}] prev")
    x0_ref = nchw_to_nhwc(ref[f"{key}_pred_original_sample"][case])
    assert_parity(x0, x0_ref, REL, f"{key}[{case}] x0")
    if t == 0:  # ᾱ_prev = final_alpha_cumprod = 1, so the last step returns x̂0 itself
        np.testing.assert_array_equal(prev, x0)


def test_add_noise_broadcast_and_per_sample_t(ref, sched):
    original = nchw_to_nhwc(ref["add_noise_original"])
    noise = nchw_to_nhwc(ref["add_noise_noise"])
    noisy = add_noise(sched.alphas_cumprod, original, noise, np.array([900]))
    assert_parity(noisy, nchw_to_nhwc(ref["ddim_add_noise_t900_noisy"]), REL, "t=[900]")
    noisy = add_noise(sched.alphas_cumprod, original, noise, ref["ddim_add_noise_tbatch"])
    assert_parity(noisy, nchw_to_nhwc(ref["ddim_add_noise_tbatch_noisy"]), REL, "t=[0, 999]")
    # A scalar t is the same as a broadcast (1,) t.
    np.testing.assert_array_equal(
        add_noise(sched.alphas_cumprod, original, noise, 900),
        add_noise(sched.alphas_cumprod, original, noise, np.array([900])),
    )


def test_ddpm_add_noise(ref, sched):
    noisy = add_noise(
        sched.alphas_cumprod,
        nchw_to_nhwc(ref["ddpm_add_noise_original"]),
        nchw_to_nhwc(ref["ddpm_add_noise_noise"]),
        ref["ddpm_add_noise_t"],
    )
    assert_parity(noisy, nchw_to_nhwc(ref["ddpm_add_noise_noisy"]), REL, "ddpm add_noise")


def test_ddpm_pred_original_sample(ref, sched):
    x0 = pred_original_sample(
        sched.alphas_cumprod,
        nchw_to_nhwc(ref["ddpm_step_noise_pred"]),
        ref["ddpm_step_t"],
        nchw_to_nhwc(ref["ddpm_step_noisy"]),
    )
    assert_parity(x0, nchw_to_nhwc(ref["ddpm_step_pred_original_sample"]), REL, "ddpm x0")


def test_add_noise_casts_alpha_to_sample_dtype(sched):
    x = jnp.ones((2, 4, 4, 4), jnp.bfloat16)
    assert add_noise(sched.alphas_cumprod, x, x, np.array([10, 900])).dtype == jnp.bfloat16
    # bf16 latents with float32 noise (training) promote to float32, as in the reference.
    noise = jnp.ones((2, 4, 4, 4), jnp.float32)
    assert add_noise(sched.alphas_cumprod, x, noise, np.array([10, 900])).dtype == jnp.float32


def _toy_eps(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """A cheap stand-in for the denoiser that depends on both the latent and the timestep."""
    return jnp.tanh(0.5 * x) + 1e-3 * t.astype(jnp.float32)


def test_ddim_step_jit_scan_vmap_match_eager(sched):
    """Traced timesteps under jit, the whole loop in lax.scan, and vmap agree with eager steps.

    Not bit-for-bit: inside one fused jit program XLA contracts a·b + c into an FMA.
    """
    ac, final = sched.alphas_cumprod, sched.final_alpha_cumprod
    ratio = ddim_step_ratio(20)
    timesteps = ddim_timesteps(20, strength=0.99)
    x_init = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), jnp.float32)

    x, eager_x0 = x_init, []
    for t in timesteps:
        x, x0 = ddim_step(ac, final, _toy_eps(x, jnp.asarray(t)), t, x, ratio)
        eager_x0.append(x0)

    @jax.jit
    def sample_loop(x_start: jnp.ndarray, ts: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        def body(carry, t):
            prev, x0 = ddim_step(ac, final, _toy_eps(carry, t), t, carry, ratio)
            return prev, x0

        return jax.lax.scan(body, x_start, ts)

    scanned, scanned_x0 = sample_loop(x_init, jnp.asarray(timesteps))
    assert_parity(scanned, x, REL, "scan vs eager")
    assert_parity(scanned_x0, np.stack(eager_x0), REL, "scan vs eager x0")

    # One jitted step with a traced t, including the t = 0 branch (ᾱ_prev = final).
    step = jax.jit(ddim_step)
    eps = _toy_eps(x_init, jnp.asarray(0))
    for t in (900, 450, 0):
        jitted = step(ac, final, eps, t, x_init, ratio)
        for got, want in zip(jitted, ddim_step(ac, final, eps, t, x_init, ratio)):
            assert_parity(got, want, REL, f"jit t={t}")

    # vmap over samples with a per-sample t equals one batched call with a (B,) t.
    ts = jnp.array([900, 0])
    per_sample = jax.vmap(ddim_step, in_axes=(None, None, 0, 0, 0, None))
    vmapped = per_sample(ac, final, eps, ts, x_init, ratio)
    batched = ddim_step(ac, final, eps, ts, x_init, ratio)
    for got, want in zip(vmapped, batched):
        assert_parity(got, want, REL, "vmap vs batched")


def _phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


N_DRAWS = 1 << 18
# Dvoretzky–Kiefer–Wolfowitz: P(sup_k |F_n(k) − F(k)| > eps) <= 2·exp(−2·n·eps²); 1e-9 failure odds.
DKW_EPS = math.sqrt(math.log(2 / 1e-9) / (2 * N_DRAWS))


def test_lognorm_timesteps_distribution():
    t = sample_timesteps(jax.random.key(1), N_DRAWS, "lognorm")
    assert t.shape == (N_DRAWS,) and t.dtype == jnp.int32
    t = np.asarray(t)
    assert t.min() >= 0 and t.max() <= 999
    # t = int(sigmoid(z)·1000) <= k  ⇔  z < logit((k + 1)/1000), so F(k) = Φ(logit((k + 1)/1000)).
    k = np.arange(999)
    p = (k + 1) / 1000
    cdf = _phi(np.log(p / (1 - p)))
    empirical = np.searchsorted(np.sort(t), k, side="right") / N_DRAWS
    assert np.max(np.abs(empirical - cdf)) < DKW_EPS
    # sigmoid(−z) = 1 − sigmoid(z) makes t symmetric about 499.5; 5 standard errors.
    pmf = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    std = math.sqrt(float(np.sum(pmf * (np.arange(1000) - 499.5) ** 2)))
    assert abs(t.mean() - 499.5) < 5 * std / math.sqrt(N_DRAWS)


def test_uniform_timesteps_distribution():
    t = np.asarray(sample_timesteps(jax.random.key(2), N_DRAWS, "uniform"))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999
    k = np.arange(1000)
    empirical = np.searchsorted(np.sort(t), k, side="right") / N_DRAWS
    assert np.max(np.abs(empirical - (k + 1) / 1000)) < DKW_EPS


@pytest.mark.parametrize("mode", ["lognorm", "uniform"])
def test_timestep_sampler_determinism(mode):
    a = sample_timesteps(jax.random.key(3), 64, mode)
    np.testing.assert_array_equal(a, sample_timesteps(jax.random.key(3), 64, mode))
    assert not np.array_equal(a, sample_timesteps(jax.random.key(4), 64, mode))
    jitted = jax.jit(sample_timesteps, static_argnums=(1, 2))
    np.testing.assert_array_equal(a, jitted(jax.random.key(3), 64, mode))


def test_timestep_sampler_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        sample_timesteps(jax.random.key(0), 4, "cosine")
