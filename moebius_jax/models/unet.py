"""The conditional UNet, assembled from a UNetConfig.

The Moebius student and the PixelHacker teacher are two configs of this one module: levels
of (resnet -> transformer) pairs on the way down, an optional mid block, mirrored up blocks
that concatenate skips, and a GroupNorm/SiLU/conv head. Submodule names follow the
reference's state-dict names (`down_blocks_0/resnets_1/...`) so the key map stays a table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from moebius_jax.config import LevelConfig, UNetConfig
from moebius_jax.layers.linear import dense
from moebius_jax.layers.norms import group_norm
from moebius_jax.layers.resnet import ResnetBlock, spatial_conv
from moebius_jax.layers.samplers import Downsample, Upsample
from moebius_jax.layers.time_embedding import TimestepEmbedding, timestep_sinusoid
from moebius_jax.layers.transformer import Transformer2D


@flax.struct.dataclass
class UNetOutput:
    """`sample`: predicted noise (B, H, W, out). `block_outputs`: each block's output in the
    reference's order (down blocks, mid block if any, up blocks), used by feature distillation."""

    sample: jnp.ndarray
    block_outputs: tuple[jnp.ndarray, ...]


class _LevelBlock(nn.Module):
    """Shared plumbing of down, mid and up blocks: one resnet (+ transformer) pair."""

    config: UNetConfig
    level: LevelConfig
    native_side: int  # the level's latent side at the trained resolution
    dtype: Any = None
    remat: bool = False

    def resnet(self, name: str) -> ResnetBlock:
        cfg = self.config
        cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
        return cls(self.level.channels, cfg.conv_kind, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name=name)

    def pair(self, j: int, h: jnp.ndarray, temb: jnp.ndarray, context: jnp.ndarray, train: bool) -> jnp.ndarray:
        h = self.resnet(f"resnets_{j}")(h, temb, train)
        if self.level.attention:
            transformer = nn.remat(Transformer2D, static_argnums=(3,)) if self.remat else Transformer2D
            h = transformer(self.config, self.level, self.native_side, dtype=self.dtype, name=f"attentions_{j}")(
                h, context, train)
        return h


class DownBlock(_LevelBlock):
    add_downsample: bool = True

    @nn.compact
    def __call__(self, h, temb, context, train: bool = False):
        skips = []
        for j in range(self.config.layers_per_block):
            h = self.pair(j, h, temb, context, train)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(dtype=self.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class UpBlock(_LevelBlock):
    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, temb, context, train: bool = False):
        for j, skip in enumerate(reversed(skips)):
            h = self.pair(j, jnp.concatenate([h, skip.astype(h.dtype)], axis=-1), temb, context, train)
        if self.add_upsample:
            h = Upsample(dtype=self.dtype, name="upsamplers_0")(h)
        return h


class MidBlock(_LevelBlock):
    """resnet -> transformer -> resnet (diffusers UNetMidBlock2DCrossAttn)."""

    @nn.compact
    def __call__(self, h, temb, context, train: bool = False):
        h = self.pair(0, h, temb, context, train)
        return self.resnet("resnets_1")(h, temb, train)


class UNet(nn.Module):
    """`remat` recomputes each resnet and transformer in the backward pass (gradient
    checkpointing): activation memory for compute, outputs unchanged."""

    config: UNetConfig
    dtype: Any = None
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        sample: jnp.ndarray,
        timesteps: jnp.ndarray,
        encoder_hidden_states: jnp.ndarray,
        train: bool = False,
    ) -> UNetOutput:
        cfg = self.config
        batch = sample.shape[0]
        num_levels = len(cfg.levels)
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        sample = sample.astype(self.dtype or sample.dtype)

        sinusoid = timestep_sinusoid(timesteps, cfg.levels[0].channels)
        temb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="time_embedding")(sinusoid)
        context = dense(cfg.cross_attention_dim, dtype=self.dtype, name="encoder_hid_proj")(encoder_hidden_states)

        h = spatial_conv(cfg.conv_kind, cfg.levels[0].channels, sample, train, dtype=self.dtype, name="conv_in")
        skips = [h]
        block_outputs = []
        for i, level in enumerate(cfg.levels):
            h, level_skips = DownBlock(
                cfg, level, cfg.native_side(i), add_downsample=i < num_levels - 1,
                dtype=self.dtype, remat=self.remat, name=f"down_blocks_{i}",
            )(h, temb, context, train)
            skips += level_skips
            block_outputs.append(h)

        if cfg.mid_level is not None:
            h = MidBlock(cfg, cfg.mid_level, cfg.native_side(num_levels - 1), dtype=self.dtype,
                         remat=self.remat, name="mid_block")(h, temb, context, train)
            block_outputs.append(h)

        per_up = cfg.layers_per_block + 1
        for i, level_index in enumerate(reversed(range(num_levels))):
            level_skips, skips = skips[-per_up:], skips[:-per_up]
            h = UpBlock(
                cfg, cfg.levels[level_index], cfg.native_side(level_index),
                add_upsample=level_index > 0, dtype=self.dtype, remat=self.remat, name=f"up_blocks_{i}",
            )(h, level_skips, temb, context, train)
            block_outputs.append(h)

        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(h))
        out = spatial_conv(cfg.conv_kind, cfg.out_channels, h, train, dtype=self.dtype, name="conv_out")
        return UNetOutput(sample=out, block_outputs=tuple(block_outputs))
