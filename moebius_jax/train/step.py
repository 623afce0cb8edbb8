"""One training step, as a pure function of (state, frozen variables, batch).

Batch (NHWC, from moebius_jax.data): image and masked_image in [-1, 1], mask {0, 1}, input_ids.
The frozen VAE encodes inside the step (posterior samples, as the reference), the noise,
noise offset and timesteps are drawn from fold_in(key, step), the teacher (if any) runs
frozen, and the student runs in train mode so BatchNorm uses and updates batch statistics.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from moebius_jax.latents import latent_mask, unet_input
from moebius_jax.models.removal_model import RemovalModel
from moebius_jax.models.vae import AutoencoderKL
from moebius_jax.schedulers import add_noise, pred_original_sample, sample_timesteps, scaled_linear_schedule
from moebius_jax.train.config import TrainConfig
from moebius_jax.train.ema import ema_update
from moebius_jax.train.objective import ExtraLoss, Targets, objective, probe_paths
from moebius_jax.train.optimizer import torch_global_norm


@flax.struct.dataclass
class Frozen:
    """Variables the step reads but never changes."""

    vae: Any
    teacher: Any = None
    extra: Any = None  # e.g. the E-LatentLPIPS network (a pytree)


def make_train_step(
    student: RemovalModel,
    vae: AutoencoderKL,
    tx: optax.GradientTransformation,
    config: TrainConfig,
    teacher: RemovalModel | None = None,
    extra_loss: ExtraLoss | None = None,
):
    """Returns step(state, frozen, batch) -> (state, metrics); jit it with shardings outside."""
    alphas = jnp.asarray(scaled_linear_schedule().alphas_cumprod)
    probes = probe_paths(student.config)
    loss_config = config.loss
    factor = vae.config.downsample_factor

    def encode(vae_variables, images, key):
        """Scaled posterior samples, the noise drawn in float32 as the sampler draws it."""
        noise = jax.random.normal(key, vae.config.latent_shape(images.shape), jnp.float32)
        return jax.lax.stop_gradient(vae.apply(vae_variables, images, noise, method="encode_latents"))

    def step(state, frozen: Frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        k_image, k_masked, k_noise, k_offset, k_time, k_extra = jax.random.split(key, 6)
        latents = encode(frozen.vae, batch["image"], k_image)
        masked = encode(frozen.vae, batch["masked_image"], k_masked)
        batch_size, channels = latents.shape[0], latents.shape[-1]
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        noise = noise + config.noise_offset * jax.random.normal(k_offset, (batch_size, 1, 1, channels))
        timesteps = sample_timesteps(k_time, batch_size, config.timestep_sampling)
        noisy = add_noise(alphas, latents.astype(jnp.float32), noise, timesteps)
        model_input = unet_input(noisy, latent_mask(batch["mask"], factor), masked)
        ids = batch["input_ids"]

        targets = Targets(noise=noise)
        if teacher is not None:
            out = teacher.apply(frozen.teacher, model_input, timesteps, ids)
            targets = Targets(noise=noise,
                              teacher_sample=jax.lax.stop_gradient(out.sample.astype(jnp.float32)),
                              teacher_feature=jax.lax.stop_gradient(
                                  out.block_outputs[loss_config.feat_index_teacher].astype(jnp.float32)))

        def forward(params):
            out, updates = student.apply({"params": params, "batch_stats": state.batch_stats},
                                         model_input, timesteps, ids, train=True, mutable=["batch_stats"])
            feature = out.block_outputs[loss_config.feat_index_student].astype(jnp.float32)
            return (out.sample.astype(jnp.float32), feature), updates["batch_stats"]

        extra = None
        if extra_loss is not None:
            latents_x0 = pred_original_sample(alphas, noise, timesteps, noisy)  # the x0 the noise implies

            def extra_term(eps, k):
                return extra_loss(frozen.extra, pred_original_sample(alphas, eps, timesteps, noisy), latents_x0, k)

            extra = extra_term

        _, grads, batch_stats, metrics = objective(forward, state.params, targets, loss_config, probes, extra, k_extra)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
            ema=None if state.ema is None else ema_update(state.ema, params),
        )
        metrics["grad_norm"] = torch_global_norm(grads)
        return new_state, metrics

    return step
