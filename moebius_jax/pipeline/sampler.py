"""The inpainting sampler: VAE encode, 19-step DDIM with classifier-free guidance, VAE decode —
one jitted program per (batch, height, width, steps, strength).

Randomness is four Gaussian draws (the two posterior samples, the initial noise and the
noise-offset draw, in the reference's order). They are an explicit input so a run can be
reproduced from a key or fed the reference's recorded draws.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moebius_jax.layers.linear import cast_weights
from moebius_jax.models.removal_model import RemovalModel
from moebius_jax.models.vae import AutoencoderKL
from moebius_jax.schedulers import add_noise, ddim_step, ddim_step_ratio, ddim_timesteps, scaled_linear_schedule


ALWAYS_GUIDE = np.iinfo(np.int32).max  # the `cfg_until` that guides every step


@flax.struct.dataclass
class SamplerNoise:
    """The four Gaussian draws of one pipeline call (NHWC latent shapes)."""

    encode_image: jnp.ndarray  # (B, h, w, c) posterior sample of the image
    encode_masked: jnp.ndarray  # (B, h, w, c) posterior sample of the masked image
    init: jnp.ndarray  # (B, h, w, c) initial noise
    offset: jnp.ndarray  # (B, 1, 1, c) noise-offset draw

    @classmethod
    def draw(cls, key: jax.Array, batch: int, latent_hw: tuple[int, int], channels: int = 4) -> SamplerNoise:
        k1, k2, k3, k4 = jax.random.split(key, 4)
        shape = (batch, *latent_hw, channels)
        return cls(
            jax.random.normal(k1, shape),
            jax.random.normal(k2, shape),
            jax.random.normal(k3, shape),
            jax.random.normal(k4, (batch, 1, 1, channels)),
        )


@flax.struct.dataclass
class SamplerOutput:
    decoded: jnp.ndarray  # (B, H, W, 3) (x + 1) / 2, not clamped
    latents: jnp.ndarray  # (B, h, w, c) scaled posterior sample of the image
    masked_latents: jnp.ndarray  # (B, h, w, c) same for the masked image
    trajectory: jnp.ndarray  # (steps + 1, B, h, w, c): start point, then x after every step


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Static settings: each combination compiles once."""

    num_steps: int = 20
    strength: float = 0.99
    # Compile the step-dependent guidance switch (`cfg_until`). It costs a second UNet in the
    # program (about twice the compile time), so programs that guide every step leave it out.
    guidance_cutoff: bool = False


class Sampler:
    """Holds the two networks and a compile cache; call it with variables and batched arrays."""

    def __init__(self, model: RemovalModel, vae: AutoencoderKL, num_embeddings: int = 20):
        self.model = model
        self.vae = vae
        self.schedule = scaled_linear_schedule()
        half = num_embeddings // 2
        # Unconditional rows are the "foreground" task ids, conditional the "background" ones.
        self.uncond_ids = np.arange(half, 2 * half, dtype=np.int32)
        self.cond_ids = np.arange(half, dtype=np.int32)
        self.trace_count = 0  # incremented on every (re)trace; tests check the cache works
        self.compile_seconds = 0.0  # total ahead-of-time compile time, for reports
        self._jitted = jax.jit(self._sample, static_argnames=("settings",))
        self._compiled: dict[Any, Any] = {}

    def __call__(
        self,
        unet_variables: Any,
        vae_variables: Any,
        image: jnp.ndarray,
        masked_image: jnp.ndarray,
        latent_mask: jnp.ndarray,
        noise: SamplerNoise,
        *,
        guidance_scale: float = 2.5,
        noise_offset: float = 0.0357,
        settings: SamplerSettings = SamplerSettings(),
        cfg_until: int | None = None,
    ) -> SamplerOutput:
        """image / masked_image (B, H, W, 3) in [-1, 1]; latent_mask (B, H/8, W/8, 1) in {0, 1}.

        Compiled ahead of time once per input signature and settings (the compile time is
        accumulated in `compile_seconds`); guidance, noise offset and `cfg_until` are runtime
        values. `cfg_until=k` guides only the first k of the steps run; later steps use the
        conditional prediction alone, at half the UNet work (None: guide every step).
        """
        if cfg_until is not None and cfg_until < 0:
            raise ValueError(f"cfg_until must be >= 0 or None, got {cfg_until}")
        if cfg_until is not None and not settings.guidance_cutoff:
            settings = dataclasses.replace(settings, guidance_cutoff=True)  # one program for every cfg_until
        until = ALWAYS_GUIDE if cfg_until is None else min(cfg_until, ALWAYS_GUIDE)
        args = (unet_variables, vae_variables, image, masked_image, latent_mask, noise,
                jnp.float32(guidance_scale), jnp.float32(noise_offset), jnp.int32(until))
        leaves, treedef = jax.tree_util.tree_flatten(args)
        signature = (treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves), settings)
        compiled = self._compiled.get(signature)
        if compiled is None:
            start = time.perf_counter()
            compiled = self._jitted.lower(*args, settings=settings).compile()
            self.compile_seconds += time.perf_counter() - start
            self._compiled[signature] = compiled
        return compiled(*args)

    def _encode(self, vae_variables: Any, images: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        mean, logvar = self.vae.apply(vae_variables, images, method="encode")
        z = mean + jnp.exp(0.5 * logvar) * noise
        z = jnp.where(jnp.isnan(z), 0.0, z)  # the reference zeroes NaNs of the posterior sample
        shift = self.vae.shift_factor or 0.0
        return (z - shift) * self.vae.scaling_factor

    def _sample(self, unet_variables, vae_variables, image, masked_image, latent_mask, noise,
                guidance_scale, noise_offset, cfg_until, *, settings: SamplerSettings) -> SamplerOutput:
        self.trace_count += 1
        latents = self._encode(vae_variables, image, noise.encode_image)
        masked_latents = self._encode(vae_variables, masked_image, noise.encode_masked)
        batch = latents.shape[0]

        timesteps = ddim_timesteps(settings.num_steps, settings.strength)
        step_ratio = ddim_step_ratio(settings.num_steps)
        alphas = jnp.asarray(self.schedule.alphas_cumprod)
        final_alpha = jnp.asarray(self.schedule.final_alpha_cumprod)
        # strength < 1: start from the clean latent noised to the first kept timestep.
        init_noise = noise.init + noise_offset * noise.offset
        x = add_noise(alphas, latents, init_noise, jnp.asarray(timesteps[:1]))

        # Once per call, not once per step: the loop then reads 16-bit weights.
        unet_variables = cast_weights(unet_variables, self.model.dtype)
        ids = jnp.asarray(np.stack([self.uncond_ids] * batch + [self.cond_ids] * batch))
        condition = jnp.concatenate([latent_mask.astype(latents.dtype), masked_latents], axis=-1)
        condition = jnp.concatenate([condition, condition], axis=0)

        def guided(x, t):
            model_input = jnp.concatenate([jnp.concatenate([x, x], axis=0), condition], axis=-1)
            eps = self.model.apply(unet_variables, model_input, t[None], ids).sample.astype(x.dtype)
            eps_uncond, eps_cond = eps[:batch], eps[batch:]
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

        def conditional(x, t):  # guidance off: only the conditional half runs
            model_input = jnp.concatenate([x, condition[batch:]], axis=-1)
            return self.model.apply(unet_variables, model_input, t[None], ids[batch:]).sample.astype(x.dtype)

        def step(x, step_input):
            t, index = step_input
            if settings.guidance_cutoff:
                # A branch, not a select, so unguided steps really skip the unconditional half.
                eps = jax.lax.cond(index < cfg_until, guided, conditional, x, t)
            else:
                eps = guided(x, t)
            x, _ = ddim_step(alphas, final_alpha, eps, t[None], x, step_ratio)
            return x, x

        start = x
        step_inputs = (jnp.asarray(timesteps, jnp.int32), jnp.arange(len(timesteps), dtype=jnp.int32))
        x, steps = jax.lax.scan(step, x, step_inputs)
        shift = self.vae.shift_factor or 0.0
        decoded = self.vae.apply(vae_variables, x / self.vae.scaling_factor + shift, method="decode")
        return SamplerOutput(
            decoded=(decoded.astype(jnp.float32) + 1) / 2,
            latents=latents,
            masked_latents=masked_latents,
            trajectory=jnp.concatenate([start[None], steps], axis=0),
        )
