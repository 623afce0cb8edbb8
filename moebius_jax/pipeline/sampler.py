"""The inpainting sampler: VAE encode, 19-step DDIM with classifier-free guidance, VAE decode —
one jitted program per (batch, height, width, steps, strength), spread over the devices.

Randomness is four Gaussian draws (the two posterior samples, the initial noise and the
noise-offset draw, in the reference's order). They are an explicit input so a run can be
reproduced from a key or fed the reference's recorded draws.

A batch is split over every device of the sampler's mesh (by default all local devices): the
rows are independent (eval-mode BatchNorm, per-image GroupNorm), so a batch that does not
divide evenly is padded with copies of its last row, and the padding is dropped afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moebius_jax.latents import guidance_task_ids, unet_input
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


def local_mesh() -> Mesh:
    """A one-axis ("batch") mesh over this process's devices: where a sampler spreads its batch."""
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), ("batch",), (AxisType.Auto,), devices=devices)


class Sampler:
    """Holds the two networks, the mesh a batch is spread over and a compile cache; call it with
    variables and batched arrays."""

    def __init__(self, model: RemovalModel, vae: AutoencoderKL, mesh: Mesh | None = None):
        self.model = model
        self.vae = vae
        self.mesh = local_mesh() if mesh is None else mesh
        self.schedule = scaled_linear_schedule()
        self.compile_seconds = 0.0  # total ahead-of-time compile time, for reports
        self._jitted = jax.jit(self._sample, static_argnames=("settings",))
        self._compiled: dict[Any, Any] = {}

    def place(self, variables: Any) -> Any:
        """Weights on the sampler's devices: arrays already spread over exactly those devices (e.g.
        a trainer's sharded state) stay as they are, anything else is replicated. Place weights
        once and pass the result to every call, or each call copies them."""
        devices = set(self.mesh.devices.flat)
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def put(x: Any) -> Any:
            if isinstance(x, jax.Array) and x.sharding.device_set == devices:
                return x
            return jax.device_put(x, replicated)

        return jax.tree.map(put, variables)

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
        batch = image.shape[0]
        rows = -(-batch // self.mesh.size) * self.mesh.size
        data = jax.tree.map(lambda x: _pad_rows(x, rows), (image, masked_image, latent_mask, noise))
        data = jax.device_put(data, NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names)))
        args = (*self.place((unet_variables, vae_variables)), *data,
                jnp.float32(guidance_scale), jnp.float32(noise_offset), jnp.int32(until))
        leaves, treedef = jax.tree_util.tree_flatten(args)
        signature = (treedef, settings,
                     tuple((np.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves))
        compiled = self._compiled.get(signature)
        if compiled is None:
            start = time.perf_counter()
            compiled = self.lower(*args, settings=settings).compile()
            self.compile_seconds += time.perf_counter() - start
            self._compiled[signature] = compiled
        out = compiled(*args)
        if rows == batch:
            return out
        return SamplerOutput(decoded=out.decoded[:batch], latents=out.latents[:batch],
                             masked_latents=out.masked_latents[:batch], trajectory=out.trajectory[:, :batch])

    def lower(self, *args: Any, settings: SamplerSettings) -> jax.stages.Lowered:
        """The sampling program for `__call__`'s positional arguments (arrays or ShapeDtypeStructs)."""
        return self._jitted.lower(*args, settings=settings)

    def _sample(self, unet_variables, vae_variables, image, masked_image, latent_mask, noise,
                guidance_scale, noise_offset, cfg_until, *, settings: SamplerSettings) -> SamplerOutput:
        latents = self.vae.apply(vae_variables, image, noise.encode_image, method="encode_latents")
        masked_latents = self.vae.apply(vae_variables, masked_image, noise.encode_masked, method="encode_latents")
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
        # Guidance runs both branches as one batch: unconditional rows first, then conditional.
        ids = jnp.asarray(guidance_task_ids(batch, self.model.config.context_length))
        mask, masked_latents_cfg = (jnp.concatenate([a, a], axis=0) for a in (latent_mask, masked_latents))

        def guided(x, t):
            model_input = unet_input(jnp.concatenate([x, x], axis=0), mask, masked_latents_cfg)
            eps = self.model.apply(unet_variables, model_input, t[None], ids).sample.astype(x.dtype)
            eps_uncond, eps_cond = eps[:batch], eps[batch:]
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

        def conditional(x, t):  # guidance off: only the conditional half runs
            model_input = unet_input(x, latent_mask, masked_latents)
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
        decoded = self.vae.apply(vae_variables, x, method="decode_latents")
        return SamplerOutput(
            decoded=(decoded.astype(jnp.float32) + 1) / 2,
            latents=latents,
            masked_latents=masked_latents,
            trajectory=jnp.concatenate([start[None], steps], axis=0),
        )


def _pad_rows(x: Any, rows: int) -> Any:
    """`x` with copies of its last row appended along axis 0 up to `rows` rows."""
    missing = rows - x.shape[0]
    return x if missing == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], missing, axis=0)], axis=0)
