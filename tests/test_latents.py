"""The latent interface: task ids, the UNet's input layout, the VAE's scaled latents."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from moebius_jax.latents import guidance_task_ids, latent_mask, task_ids, unet_input
from moebius_jax.models.vae import AutoencoderKL, DiagonalGaussian


def test_task_ids():
    np.testing.assert_array_equal(task_ids("background"), np.arange(10))
    np.testing.assert_array_equal(task_ids("foreground"), np.arange(10, 20))
    assert task_ids("background").dtype == np.int32
    np.testing.assert_array_equal(task_ids("foreground", 3), [3, 4, 5])
    # Guidance: the unconditional (foreground) rows first, then the conditional ones.
    np.testing.assert_array_equal(guidance_task_ids(2, 3), [[3, 4, 5], [3, 4, 5], [0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match="task must be one of"):
        task_ids("object")


def test_unet_input_layout_and_latent_mask():
    mask = np.zeros((2, 16, 16, 1), np.uint8)
    mask[:, 0, 0] = 1  # a top-left pixel: kept
    mask[:, 4, 12] = 1  # a cell centre: dropped
    small = latent_mask(mask, 8)
    assert small.shape == (2, 2, 2, 1) and small[:, 0, 0, 0].all() and small.sum() == 2
    x = unet_input(np.zeros((2, 2, 2, 4), np.float32), small, np.full((2, 2, 2, 4), 2, np.float32))
    assert x.dtype == np.float32 and x.shape == (2, 2, 2, 9)
    np.testing.assert_array_equal(x[0, 0, 0], [0, 0, 0, 0, 1, 2, 2, 2, 2])


def test_encode_and_decode_latents_shift_and_scale(tiny_vae):
    vae, variables = tiny_vae
    vae = AutoencoderKL(dataclasses.replace(vae.config, shift_factor=0.25), vae.dtype)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    noise = jax.random.normal(jax.random.key(0), vae.config.latent_shape(images.shape))
    assert noise.shape == (2, 2, 2, vae.config.latent_channels)

    @jax.jit
    def run(variables, images, noise):
        posterior = DiagonalGaussian(*vae.apply(variables, images, method="encode"))
        latents = vae.apply(variables, images, noise, method="encode_latents")
        return (posterior.reparameterize(noise), latents, vae.apply(variables, latents, method="decode_latents"),
                vae.apply(variables, latents / vae.config.scaling_factor + 0.25, method="decode"))

    z, latents, decoded, expected = run(variables, images, noise)
    np.testing.assert_allclose(latents, (z - 0.25) * vae.config.scaling_factor, rtol=1e-6)
    np.testing.assert_array_equal(decoded, expected)
