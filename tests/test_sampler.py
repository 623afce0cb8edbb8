"""The jitted sampler against every stage of the reference pipeline (pipeline_tiny)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import assert_parity, fixture_path, load_npz, nchw_to_nhwc

from moebius_jax.latents import CONDITIONAL_TASK, task_ids
from moebius_jax.pipeline.postprocess import paste, to_uint8
from moebius_jax.pipeline.preprocess import load_pair, prepare
from moebius_jax.pipeline.sampler import Sampler, SamplerNoise, SamplerSettings
from moebius_jax.schedulers import ddim_step, ddim_step_ratio, ddim_timesteps


@pytest.fixture(scope="module")
def stages():
    return load_npz("pipeline_tiny", "stages.npz")


@pytest.fixture(scope="module")
def networks(tiny_student, tiny_vae):
    (model, unet_vars), (vae, vae_vars) = tiny_student, tiny_vae
    return Sampler(model, vae), unet_vars, vae_vars


@pytest.fixture(scope="module")
def run(networks, stages):
    sampler, unet_vars, vae_vars = networks
    prepared = prepare(*load_pair(fixture_path("pipeline_tiny", "image_0.png"),
                                  fixture_path("pipeline_tiny", "mask_000000.png")), resolution=128)
    noise = SamplerNoise(
        encode_image=nchw_to_nhwc(stages["encode_noise_image"]),
        encode_masked=nchw_to_nhwc(stages["encode_noise_masked"]),
        init=nchw_to_nhwc(stages["init_noise_base"]),
        offset=nchw_to_nhwc(stages["init_noise_offset_draw"]),
    )
    out = sampler(unet_vars, vae_vars, prepared.image[None], prepared.masked_image[None],
                  prepared.latent_mask[None], noise, guidance_scale=2.5, noise_offset=0.0357)
    return out, prepared


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_encoded_latents(run, stages):
    out, _ = run
    for name in ("latents", "masked_latents"):
        ref = nchw_to_nhwc(stages[name])
        assert _max_abs(getattr(out, name), ref) <= 1e-4 * np.abs(ref).max(), name


def test_every_denoising_step(run, stages):
    """Start point then the 19 DDIM steps; the reference drifts 1.5e-4 from float64 by the end."""
    out, _ = run
    ref = np.moveaxis(stages["latents_per_step"], 2, -1)
    assert out.trajectory.shape == ref.shape
    for i in range(ref.shape[0]):
        assert _max_abs(out.trajectory[i], ref[i]) <= 1e-3, f"step {i}"


def test_decoded_and_final_images(run, stages):
    out, prepared = run
    assert _max_abs(out.decoded[0], nchw_to_nhwc(stages["decoded_01"])[0]) <= 1e-3
    result = to_uint8(np.asarray(out.decoded[0]))
    diff = np.abs(result.astype(int) - stages["decoded_uint8"].astype(int))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 50, (diff.max(), np.count_nonzero(diff))
    pasted = paste(result, prepared.resized_image, prepared.resized_mask)
    diff = np.abs(pasted.astype(int) - stages["out_paste"].astype(int))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 50


def test_sampler_compiles_once_per_shape(networks, run):
    sampler, unet_vars, vae_vars = networks
    _, prepared = run
    compiled = sampler.compile_seconds
    assert compiled > 0  # the fixture run compiled
    args = (unet_vars, vae_vars, prepared.image[None], prepared.masked_image[None], prepared.latent_mask[None])

    for seed in (1, 2):
        noise = SamplerNoise.draw(jax.random.key(seed), 1, (16, 16))
        sampler(*args, noise, guidance_scale=1.5 + seed)  # guidance is traced: no recompile
    assert sampler.compile_seconds == compiled  # same shapes as the fixture run: cached
    sampler(*args, noise, settings=SamplerSettings(num_steps=10))
    assert sampler.compile_seconds > compiled


@pytest.fixture(scope="module")
def cut_runs(networks, run, stages):
    """The fixture's inputs sampled with guidance stopped after 0, 7 and all 19 steps (one program)."""
    sampler, unet_vars, vae_vars = networks
    _, prepared = run
    args = (unet_vars, vae_vars, prepared.image[None], prepared.masked_image[None], prepared.latent_mask[None],
            SamplerNoise.draw(jax.random.key(3), 1, (16, 16)))
    return {k: sampler(*args, cfg_until=k) for k in (0, 7, 19, None)}, args


def test_cfg_until_guides_exactly_the_first_steps(networks, cut_runs, tiny_student_apply):
    sampler, unet_vars, _ = networks
    runs, args = cut_runs
    guided, cut = runs[19], runs[7]
    # cfg_until = the number of steps guides every step: the default program's result.
    assert_parity(guided.trajectory, runs[None].trajectory, name="cfg_until=19")
    # The first 7 steps are the guided ones bit for bit; step 8 differs.
    np.testing.assert_array_equal(cut.trajectory[:8], guided.trajectory[:8])
    assert not np.allclose(cut.trajectory[8], guided.trajectory[8])
    # By hand: step 8 (index 7) is DDIM on the conditional prediction alone.
    t = int(ddim_timesteps(20, 0.99)[7])
    x = cut.trajectory[7]
    model_input = np.concatenate([x, args[4], cut.masked_latents], axis=-1)
    eps = tiny_student_apply(unet_vars, model_input, np.array([t]), task_ids(CONDITIONAL_TASK)[None]).sample
    expected, _ = ddim_step(sampler.schedule.alphas_cumprod, sampler.schedule.final_alpha_cumprod, eps,
                            np.array([t]), x, ddim_step_ratio(20))
    assert_parity(cut.trajectory[8], expected, name="unguided step")


def test_cfg_until_zero_is_guidance_scale_one(networks, cut_runs):
    """eps_u + 1 * (eps_c - eps_u) = eps_c: never guiding equals guidance scale 1 (to rounding)."""
    sampler, *_ = networks
    runs, args = cut_runs
    scale_one = sampler(*args, guidance_scale=1.0, cfg_until=19)
    assert_parity(runs[0].trajectory, scale_one.trajectory, name="cfg_until=0")
    assert_parity(runs[0].decoded, scale_one.decoded, name="decoded")
