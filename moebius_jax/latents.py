"""What the UNet is fed, defined once for training, sampling, benchmarks and evaluation.

The UNet's input is 9 channels, `[noisy latent (4) | latent mask (1) | masked-image latent (4)]`,
and its condition is a row of task ids. Latents themselves (encode to scaled posterior
samples, decode) are methods of the VAE: `AutoencoderKL.encode_latents` / `decode_latents`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import jax.numpy as jnp

# Ids per task: the embedding table holds 2 * CONTEXT_LENGTH rows, one block per task.
CONTEXT_LENGTH = 10
# A task is a block of consecutive ids. "background" (fill the hole with scene content; the
# conditional branch of classifier-free guidance) owns ids 0-9, "foreground" (the object
# prompt; guidance's unconditional branch) ids 10-19.
TASKS = ("background", "foreground")
CONDITIONAL_TASK, UNCONDITIONAL_TASK = TASKS

Array = TypeVar("Array", np.ndarray, "jnp.ndarray")


def task_ids(task: str, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """The (context_length,) int32 id row of `task` ("background" or "foreground")."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    start = TASKS.index(task) * context_length
    return np.arange(start, start + context_length, dtype=np.int32)


def guidance_task_ids(batch: int, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """(2 * batch, context_length) ids of a guidance batch: unconditional rows, then conditional."""
    return np.stack([task_ids(UNCONDITIONAL_TASK, context_length)] * batch
                    + [task_ids(CONDITIONAL_TASK, context_length)] * batch)


def latent_mask(mask: Array, factor: int) -> Array:
    """The pixel mask (..., H, W, 1) at latent resolution (..., H/f, W/f, 1).

    torch's legacy "nearest" resize, as the reference uses: the top-left pixel of each
    f x f cell (not the cell's centre, and not its maximum).
    """
    return mask[..., ::factor, ::factor, :]


def unet_input(noisy: jnp.ndarray, mask: jnp.ndarray, masked_latents: jnp.ndarray) -> jnp.ndarray:
    """The UNet's input `[noisy | latent mask | masked-image latents]` (channels last), in noisy's dtype."""
    import jax.numpy as jnp  # here, not at the top: data-loader workers import this module for task ids

    return jnp.concatenate([noisy, mask.astype(noisy.dtype), masked_latents.astype(noisy.dtype)], axis=-1)
