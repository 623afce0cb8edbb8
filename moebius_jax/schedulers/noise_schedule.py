"""The reference's noise schedule (scaled-linear betas, float32 ᾱ table) and the two closed-form
maps every sampler and loss shares: forward noising and the epsilon-parameterised x̂0.

The square roots here are correctly rounded; the reference's float32 sqrt (torch 2.13 CPU) is not
(about 1 input in 5 comes out 1 ulp off), so a few coefficients differ from it by 1 ulp.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# The Moebius reference (infer/utils.py, train_distillation.py) builds both schedulers with these.
BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000


# eq=False keeps identity hashing, so a schedule can be a static jit argument.
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Float32 beta/ᾱ tables of a DDPM/DDIM scheduler, as host numpy arrays."""

    betas: np.ndarray  # (N,) float32
    alphas_cumprod: np.ndarray  # (N,) float32, ᾱ_t = prod_{s<=t} (1 - β_s)
    final_alpha_cumprod: np.ndarray  # () float32, ᾱ used past t = 0 (set_alpha_to_one → 1)
    num_train_timesteps: int

    def __post_init__(self) -> None:
        # frozen only stops rebinding; read-only arrays keep the shared tables constant too.
        for table in (self.betas, self.alphas_cumprod, self.final_alpha_cumprod):
            table.setflags(write=False)


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """float32 linspace bit-identical to the reference's CPU kernel.

    Each point is taken from the nearer end, `start + step·i` (first half) or
    `end − step·(num−1−i)`, as one float32 fused multiply-add with a float32 step;
    numpy's linspace (float64, then cast) differs in ~300 of 1000 betas by 1 ulp.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    # step·i is exact in float64 and, at these magnitudes, so is the sum: the one rounding to
    # float32 below is then exactly the FMA's.
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (num - 1 - i)
    return np.where(i < num // 2, from_start, from_end).astype(np.float32)


def scaled_linear_schedule(
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> NoiseSchedule:
    """The "scaled_linear" schedule β = linspace(√β0, √β1, N)² in the reference's float32 order."""
    betas = np.square(_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps))
    # The reference's CPU cumprod accumulates in float64 and stores float32 (a float32 running
    # product differs in most entries by up to 3e-7).
    alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    return NoiseSchedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        final_alpha_cumprod=np.array(1.0, dtype=np.float32),
        num_train_timesteps=num_train_timesteps,
    )


def expand_per_sample(values: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Shape per-sample coefficients (), (1,) or (B,) to broadcast against batch-first arrays."""
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[:1] + (1,) * (ndim - 1))


def add_noise(
    alphas_cumprod: ArrayLike, original: ArrayLike, noise: ArrayLike, timesteps: ArrayLike
) -> jnp.ndarray:
    """Forward diffusion x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; `timesteps` is a scalar, (1,) or (B,).

    As in the reference, ᾱ is cast to `original`'s dtype before the square roots (bf16 when
    training).
    """
    original, noise = jnp.asarray(original), jnp.asarray(noise)
    alpha = jnp.asarray(alphas_cumprod).astype(original.dtype)[jnp.asarray(timesteps)]
    alpha = expand_per_sample(alpha, original.ndim)
    return jnp.sqrt(alpha) * original + jnp.sqrt(1 - alpha) * noise


def pred_original_sample(
    alphas_cumprod: ArrayLike, model_output: ArrayLike, timesteps: ArrayLike, sample: ArrayLike
) -> jnp.ndarray:
    """Epsilon-parameterised x̂0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t; `timesteps`: scalar, (1,) or (B,).

    The coefficients stay float32, as in the reference's scheduler steps (DDPM and DDIM).
    """
    model_output, sample = jnp.asarray(model_output), jnp.asarray(sample)
    alpha = expand_per_sample(jnp.asarray(alphas_cumprod)[jnp.asarray(timesteps)], sample.ndim)
    return (sample - jnp.sqrt(1 - alpha) * model_output) / jnp.sqrt(alpha)
