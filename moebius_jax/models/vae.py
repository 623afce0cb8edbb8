"""The SD "f8d4" AutoencoderKL (diffusers layout) in Flax, NHWC.

One module serves the SD and SDXL VAEs (and any diffusers AutoencoderKL built from
DownEncoderBlock2D / UpDecoderBlock2D): everything structural comes from `VaeConfig`, read
from diffusers' config.json. Submodule names mirror the diffusers state-dict names
(`encoder/down_blocks_0/resnets_1`, `decoder/mid_block/attentions_0/to_q`, ...) so that the
key map (`moebius_jax.convert.vae_keys`) is a table.

Images are NHWC in [-1, 1]. `encode` / `decode` work on the raw latent space;
`encode_latents` / `decode_latents` on the diffusion model's (shifted and scaled) latents, which
is what training and sampling use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moebius_jax.layers.attention import Attention
from moebius_jax.layers.linear import conv2d
from moebius_jax.layers.norms import group_norm
from moebius_jax.layers.residual import add_residual
from moebius_jax.layers.resnet import ResnetBlock
from moebius_jax.layers.samplers import Downsample, Upsample

NORM_EPS = 1e-6  # diffusers' AutoencoderKL uses 1e-6 in every GroupNorm
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance clamp

# Keys of a diffusers config.json that must hold these values for this module to be the model
# the file describes (anything else there, e.g. sample_size or force_upcast, has no effect here).
_DOWN_BLOCK, _UP_BLOCK, _ACT_FN = "DownEncoderBlock2D", "UpDecoderBlock2D", "silu"


def _as_list(value: Any) -> Any:
    """JSON lists and Python tuples compare equal after this."""
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """The fields of diffusers' AutoencoderKL config that fix structure and latent scaling.

    Defaults are diffusers' AutoencoderKL defaults, so older config.json files that lack a
    field (shift_factor, use_quant_conv, mid_block_add_attention, ...) read as diffusers reads them.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for the four-level SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(B, H/f, W/f, latent_channels) of an image batch of shape (B, H, W, C)."""
        b, height, width = image_shape[:3]
        f = self.downsample_factor
        return b, height // f, width // f, self.latent_channels

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VaeConfig:
        """Read a diffusers AutoencoderKL config dict; refuse architectures this module does not build."""
        levels = len(raw.get("block_out_channels", cls.block_out_channels))
        expected = {
            "act_fn": _ACT_FN,
            "down_block_types": [_DOWN_BLOCK] * levels,
            "up_block_types": [_UP_BLOCK] * levels,
        }
        bad = [f"{k}={raw[k]!r} (supported: {v!r})"
               for k, v in expected.items() if k in raw and _as_list(raw[k]) != v]
        if bad:
            raise ValueError("unsupported AutoencoderKL config: " + "; ".join(bad))
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A complete diffusers config.json for this VAE (what `save_vae` writes)."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": _ACT_FN,
            "down_block_types": [_DOWN_BLOCK] * levels,
            "up_block_types": [_UP_BLOCK] * levels,
            **{k: _as_list(v) for k, v in dataclasses.asdict(self).items()},
        }


# The SD 1.x VAE (sd-vae-ft-mse family), the default for LDM single files that carry no config.
# The SDXL VAE has the same shapes with scaling_factor 0.13025: pass its config explicitly.
SD_VAE_CONFIG = VaeConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2)


def split_moments(moments: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """quant_conv output (..., 2L) -> (mean, logvar), logvar clamped to [-30, 20] as the reference does."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); a pytree, so it passes through jit."""

    mean: jnp.ndarray
    logvar: jnp.ndarray  # already clamped (see split_moments)

    @property
    def std(self) -> jnp.ndarray:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jnp.ndarray:
        return self.mean

    def sample(self, key: jax.Array) -> jnp.ndarray:
        """mean + std * N(0, 1) drawn from `key`."""
        return self.reparameterize(jax.random.normal(key, self.mean.shape, self.mean.dtype))

    def reparameterize(self, noise: jnp.ndarray) -> jnp.ndarray:
        """mean + std * noise, with NaNs replaced by 0 as the reference pipeline does after sampling."""
        z = self.mean + self.std * noise
        return jnp.where(jnp.isnan(z), jnp.zeros_like(z), z)


def vae_resnet(features: int, groups: int, dtype: Any, name: str) -> ResnetBlock:
    """The VAE's resnet: dense 3x3 convs, GroupNorm eps 1e-6, no time embedding."""
    return ResnetBlock(features, conv_kind="dense", groups=groups, eps=NORM_EPS, dtype=dtype, name=name)


class AttentionBlock(nn.Module):
    """The VAE's mid-block attention: GroupNorm -> single-head attention over all pixels -> + input."""

    groups: int
    dtype: Any = None

    def setup(self) -> None:
        self.group_norm = group_norm(self.groups, NORM_EPS, self.dtype)
        self.attention = Attention(num_heads=1, qkv_bias=True, dtype=self.dtype)
        # to_q/to_k/to_v/to_out sit directly beside group_norm, as in the state dict.
        nn.share_scope(self, self.attention)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, height, width, c = x.shape
        h = self.attention(self.group_norm(x).reshape(b, height * width, c))
        return add_residual(x, h.reshape(x.shape))


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution (diffusers UNetMidBlock2D)."""

    features: int
    groups: int
    add_attention: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        h = vae_resnet(self.features, self.groups, self.dtype, "resnets_0")(h)
        if self.add_attention:
            h = AttentionBlock(self.groups, dtype=self.dtype, name="attentions_0")(h)
        return vae_resnet(self.features, self.groups, self.dtype, "resnets_1")(h)


class Level(nn.Module):
    """One resolution level: `num_resnets` resnets, then an optional 2x down- or up-sampler
    (DownEncoderBlock2D with sampler "down", UpDecoderBlock2D with "up")."""

    features: int
    num_resnets: int
    groups: int
    sampler: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        for j in range(self.num_resnets):
            h = vae_resnet(self.features, self.groups, self.dtype, f"resnets_{j}")(h)
        if self.sampler == "down":
            h = Downsample(pad_bottom_right=True, dtype=self.dtype, name="downsamplers_0")(h)
        elif self.sampler == "up":
            h = Upsample(dtype=self.dtype, name="upsamplers_0")(h)
        return h


def _head(h: jnp.ndarray, features: int, groups: int, dtype: Any) -> jnp.ndarray:
    """GroupNorm -> SiLU -> 3x3 conv closing the encoder and the decoder (call in a compact method)."""
    h = nn.silu(group_norm(groups, NORM_EPS, dtype, "conv_norm_out")(h))
    return conv2d(features, 3, dtype=dtype, name="conv_out")(h)


class Encoder(nn.Module):
    """Image (B, H, W, in) -> (B, H/f, W/f, 2 * latent) pre-quant moments."""

    config: VaeConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, groups = self.config, self.config.norm_num_groups
        widths = cfg.block_out_channels
        h = conv2d(widths[0], 3, dtype=self.dtype, name="conv_in")(x)
        for i, width in enumerate(widths):
            sampler = "down" if i < len(widths) - 1 else None
            h = Level(width, cfg.layers_per_block, groups, sampler, self.dtype, name=f"down_blocks_{i}")(h)
        h = MidBlock(widths[-1], groups, cfg.mid_block_add_attention, self.dtype, name="mid_block")(h)
        return _head(h, 2 * cfg.latent_channels, groups, self.dtype)


class Decoder(nn.Module):
    """Latent (B, h, w, latent) -> image (B, h*f, w*f, out); levels run in reverse width order."""

    config: VaeConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        cfg, groups = self.config, self.config.norm_num_groups
        widths = tuple(reversed(cfg.block_out_channels))
        h = conv2d(widths[0], 3, dtype=self.dtype, name="conv_in")(z)
        h = MidBlock(widths[0], groups, cfg.mid_block_add_attention, self.dtype, name="mid_block")(h)
        for i, width in enumerate(widths):
            sampler = "up" if i < len(widths) - 1 else None
            h = Level(width, cfg.layers_per_block + 1, groups, sampler, self.dtype, name=f"up_blocks_{i}")(h)
        return _head(h, cfg.out_channels, groups, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL; f = `config.downsample_factor` (8). Methods (use with
    `apply(..., method=...)`):

    `encode_latents(images, noise)` / `decode_latents(latents)` (the diffusion model's latents),
    `encode(images) -> (mean, logvar)`, `decode(latents) -> images` (raw latents), `moments(images)`
    (the quant_conv output), `encode_tiled` / `decode_tiled` for large inputs, and `__call__`
    (encode, take the mode or a sample, decode) which also initialises every parameter.
    """

    config: VaeConfig
    dtype: Any = None

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv2d(2 * cfg.latent_channels, 1, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv2d(cfg.latent_channels, 1, dtype=self.dtype)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        return self.config.shift_factor

    def moments(self, images: jnp.ndarray) -> jnp.ndarray:
        """Images (B, H, W, in) -> (B, H/f, W/f, 2 * latent): mean and raw logvar, concatenated."""
        h = self.encoder(images)
        return self.quant_conv(h) if self.config.use_quant_conv else h

    def encode(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Images in [-1, 1] -> the posterior's (mean, clamped logvar)."""
        return split_moments(self.moments(images))

    def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
        """Unscaled latents (B, h, w, latent) -> images (B, f*h, f*w, out), nominally in [-1, 1]."""
        z = self.post_quant_conv(latents) if self.config.use_post_quant_conv else latents
        return self.decoder(z)

    def encode_latents(self, images: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        """Images in [-1, 1] -> the diffusion model's latents: the posterior sampled with `noise`
        (standard normal, `config.latent_shape(images.shape)`; NaNs zeroed), shifted and scaled."""
        z = DiagonalGaussian(*self.encode(images)).reparameterize(noise)
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def decode_latents(self, latents: jnp.ndarray) -> jnp.ndarray:
        """The diffusion model's latents -> images (nominally in [-1, 1]): unscale, unshift, decode."""
        return self.decode(latents / self.scaling_factor + (self.shift_factor or 0.0))

    def __call__(self, images: jnp.ndarray, sample_key: jax.Array | None = None) -> jnp.ndarray:
        """Reconstruction: decode the posterior's mode, or a sample when `sample_key` is given."""
        posterior = DiagonalGaussian(*self.encode(images))
        z = posterior.mode() if sample_key is None else posterior.sample(sample_key)
        return self.decode(z)

    def encode_tiled(
        self, images: jnp.ndarray, tile: int = 512, overlap: int = 128
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`encode` over `tile` x `tile` pixel tiles overlapping by `overlap` pixels.

        The moments of neighbouring tiles are cross-faded linearly over the overlap, then
        split as in `encode`. Each tile is normalised on its own, so the result approximates
        (does not equal) `encode`. Sides, tile and overlap must be multiples of 8 (the
        downsample factor).
        """
        f = self.config.downsample_factor
        bad = {"height": images.shape[1], "width": images.shape[2], "tile": tile, "overlap": overlap}
        bad = {k: v for k, v in bad.items() if v % f}
        if bad:
            raise ValueError(f"encode_tiled needs multiples of {f}: {bad}")
        return split_moments(self._tiled("moments", images, tile, overlap, Fraction(1, f)))

    def decode_tiled(self, latents: jnp.ndarray, tile: int = 64, overlap: int = 16) -> jnp.ndarray:
        """`decode` over `tile` x `tile` latent tiles overlapping by `overlap` latent pixels.

        Decoded tiles are cross-faded linearly over the (f times larger) overlap. Peak memory
        is one tile's decode plus the input and the output, whatever the image size; each tile
        is normalised on its own, so the result approximates (does not equal) `decode`, which
        stays the exact default.
        """
        return self._tiled("decode", latents, tile, overlap, Fraction(self.config.downsample_factor))

    def _tiled(self, method: str, x: jnp.ndarray, tile: int, overlap: int, scale: Fraction) -> jnp.ndarray:
        """Run `method` (side-scaling by `scale`) over a static grid of equal overlapping tiles.

        A lifted scan runs one tile per step (so only one tile's activations are ever live)
        and accumulates weight * output into a float32 canvas; the weights are separable
        linear ramps, normalised by their static sum.
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        b, height, width, c = x.shape
        ty, tx = min(tile, height), min(tile, width)
        starts_y, ramps_y, total_y = tile_layout(height, ty, overlap, scale)
        starts_x, ramps_x, total_x = tile_layout(width, tx, overlap, scale)
        pairs = [(iy, ix) for iy in range(len(starts_y)) for ix in range(len(starts_x))]
        items = (
            jnp.asarray([starts_y[iy] for iy, _ in pairs], jnp.int32),
            jnp.asarray([starts_x[ix] for _, ix in pairs], jnp.int32),
            jnp.asarray(np.stack([ramps_y[iy] for iy, _ in pairs])),
            jnp.asarray(np.stack([ramps_x[ix] for _, ix in pairs])),
        )
        out_channels = 2 * self.config.latent_channels if method == "moments" else self.config.out_channels

        def step(module: AutoencoderKL, canvas: jnp.ndarray, item: tuple[jnp.ndarray, ...]):
            y0, x0, ramp_y, ramp_x = item
            part = getattr(module, method)(lax.dynamic_slice(x, (0, y0, x0, 0), (b, ty, tx, c)))
            weighted = part.astype(jnp.float32) * (ramp_y[:, None] * ramp_x[None, :])[None, :, :, None]
            # Tile starts are multiples of 1/scale (checked by the caller), so this is exact.
            at = (0, y0 * scale.numerator // scale.denominator, x0 * scale.numerator // scale.denominator, 0)
            canvas = lax.dynamic_update_slice(canvas, lax.dynamic_slice(canvas, at, part.shape) + weighted, at)
            return canvas, None

        scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False})
        canvas = jnp.zeros((b, total_y.size, total_x.size, out_channels), jnp.float32)
        canvas, _ = scan(self, canvas, items)
        return canvas / jnp.asarray(total_y[:, None] * total_x[None, :])[None, :, :, None]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal tiles covering [0, size): stride tile - overlap, the last flush with the end."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def tile_layout(
    size: int, tile: int, overlap: int, scale: Fraction
) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """Along one axis (input units): tile starts, each tile's blend weights and their per-pixel
    sum (output units, `scale` output pixels per input pixel).

    A tile's weight ramps linearly from ~0 to 1 across `overlap` on every side that has a
    neighbour and is 1 elsewhere, so two tiles overlapping by exactly `overlap` cross-fade
    with weights summing to 1; any other overlap is normalised by the sum.
    """
    starts = tile_starts(size, tile, overlap)
    out_tile, out_overlap, out_size = (int(v * scale) for v in (tile, overlap, size))
    ramp = (np.arange(out_overlap, dtype=np.float32) + 0.5) / max(out_overlap, 1)
    ramps, total = [], np.zeros(out_size, np.float32)
    for start in starts:
        weight = np.ones(out_tile, np.float32)
        if start > 0:
            weight[:out_overlap] = ramp
        if start + tile < size:
            weight[out_tile - out_overlap:] = np.minimum(weight[out_tile - out_overlap:], ramp[::-1])
        ramps.append(weight)
        at = int(start * scale)
        total[at:at + out_tile] += weight
    return starts, ramps, total
