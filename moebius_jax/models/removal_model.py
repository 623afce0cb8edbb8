"""The input-id front of Moebius and PixelHacker (the reference's `RemovalModel`).

There is no text encoder: the 10 task tokens (0-9 background/removal, 10-19 foreground)
index a learned table whose rows play the role of text embeddings for the UNet.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moebius_jax.config import UNetConfig
from moebius_jax.models.unet import UNet, UNetOutput


class RemovalModel(nn.Module):
    """`embedding_layer` (num_embeddings x encoder_hid_dim) feeding `diff_model` (the UNet).

    Call: sample (B, H, W, in) float, timesteps (B,), (1,) or scalar int, input_ids (B, L) int.
    """

    config: UNetConfig
    dtype: Any = None
    remat: bool = False  # gradient checkpointing of every resnet and transformer

    @nn.compact
    def __call__(
        self,
        sample: jnp.ndarray,
        timesteps: jnp.ndarray,
        input_ids: jnp.ndarray,
        train: bool = False,
    ) -> UNetOutput:
        cfg = self.config
        embeddings = nn.Embed(
            cfg.num_embeddings, cfg.encoder_hid_dim, embedding_init=nn.initializers.normal(1.0),
            dtype=self.dtype, name="embedding_layer",
        )(input_ids)
        return UNet(cfg, dtype=self.dtype, remat=self.remat, name="diff_model")(sample, timesteps, embeddings, train)
