"""E-LatentLPIPS (encoder "sdxl", augment "bg"): a perceptual distance between SDXL-VAE latents.

A VGG16-BN trained on 4-channel latents (only the last two of its five max-pools kept) gives
five feature taps; each is unit-normalised along channels, the squared difference of the two
inputs' taps is weighted per channel by a learned non-negative head, averaged over space and
summed over taps, and an L1 term on the inputs is added. With `ensembling=True` both inputs
first go through one shared random geometric transform per sample (`latent_augment`).

The distance is a pure function of its inputs and an explicit PRNG key, so it can sit inside
a jitted train step; gradients flow to the latents, never to the (frozen) network.
Pass the `ELatentLPIPS` object as an argument of the jitted function rather than closing
over it, so its ~59 MB of weights are not baked into the compiled program as constants.
Everything runs in float32; on GPUs, JAX's default float32 conv precision is TF32-like, so
use `jax.default_matmul_precision("highest")` where agreement with the reference matters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moebius_jax.layers.batch_norm import BatchNorm
from moebius_jax.layers.linear import conv2d
from moebius_jax.losses.latent_augment import AugmentParams, augment_pair, sample_params

SDXL_LATENT_SCALE = 0.13025  # `normalize=True` multiplies by the SDXL VAE scaling factor (no shift)
VGG16_WIDTHS = (64, 128, 256, 512, 512)  # channels of the five taps
STAGE_CONVS = (2, 2, 3, 3, 3)  # 3x3 convs per VGG16 stage
POOLED_STAGES = (3, 4)  # stages that keep their 2x2 max-pool (the latent trunk drops the first three)
UNIT_NORM_EPS = 1e-8  # added to the channel sum of squares, inside the square root


class LatentVGG16BN(nn.Module):
    """VGG16-BN "features" on latents, in eval mode, returning the five stage outputs (taps).

    Submodules are named `slice{S}_{I}` after torchvision's layer index I, which the state
    dict keys carry; taps 3 and 4 are taken after their max-pool.
    """

    widths: tuple[int, ...] = VGG16_WIDTHS

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps, index = [], 0
        for stage, (width, convs) in enumerate(zip(self.widths, STAGE_CONVS, strict=True)):
            name = f"slice{stage + 1}"
            for _ in range(convs):  # conv, BatchNorm, ReLU occupy three indices
                x = conv2d(width, 3, name=f"{name}_{index}")(x)
                x = nn.relu(BatchNorm(name=f"{name}_{index + 1}")(x, train=False))
                index += 3
            if stage in POOLED_STAGES:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            index += 1  # the pool, or the Identity that replaced it
            taps.append(x)
        return taps


def unit_normalize(f: jax.Array) -> jax.Array:
    """Scale every feature vector (last axis) to unit length; eps inside the root as the reference."""
    return f / jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + UNIT_NORM_EPS)


class ELatentLPIPSNetwork(nn.Module):
    """Trunk (`net`) plus the five linear heads (`lin0`..`lin4`, 1x1 convs without bias)."""

    widths: tuple[int, ...] = VGG16_WIDTHS

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """(B, 5) per-tap distances r_k between two prepared (scaled, augmented) NHWC batches."""
        batch = x0.shape[0]
        taps = LatentVGG16BN(self.widths, name="net")(jnp.concatenate([x0, x1]))  # one pass for both
        out = []
        for k, tap in enumerate(taps):
            f = unit_normalize(tap)
            weighted = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}")(jnp.square(f[:batch] - f[batch:]))
            out.append(jnp.mean(weighted, axis=(1, 2, 3)))
        return jnp.stack(out, axis=-1)


@struct.dataclass
class ELatentLPIPS:
    """The metric's weights (a pytree, safe to pass into jit) and its static widths."""

    variables: dict[str, Any]
    widths: tuple[int, ...] = struct.field(pytree_node=False, default=VGG16_WIDTHS)

    @property
    def network(self) -> ELatentLPIPSNetwork:
        return ELatentLPIPSNetwork(self.widths)

    def __call__(self, x0: jax.Array, x1: jax.Array, **kwargs: Any) -> jax.Array:
        """Shorthand for `elatentlpips_distance(self, x0, x1, **kwargs)`."""
        return elatentlpips_distance(self, x0, x1, **kwargs)


class DistanceTerms(NamedTuple):
    """The parts of the distance: per-tap values (B, 5) and the L1 term (B,)."""

    layers: jax.Array
    l1: jax.Array

    def total(self, add_l1: bool = True) -> jax.Array:
        """Sum in the reference's order, ((((r0 + r1) + r2) + r3) + r4) + l1."""
        out = self.layers[..., 0]
        for k in range(1, self.layers.shape[-1]):
            out = out + self.layers[..., k]
        return out + self.l1 if add_l1 else out


def l1_distance(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """Mean |x0 - x1| per sample (B,), with torch's gradient: 0 where the two are equal.

    `jnp.abs` has gradient +1 at 0; `d * sign(d)` is the same value with gradient sign(d), which
    is 0 at d = 0. It matters in training, where predicted and target latents can coincide.
    """
    d = x0 - x1
    return jnp.mean(d * jnp.sign(d), axis=(1, 2, 3))


def _prepare(x: jax.Array, normalize: bool) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x * SDXL_LATENT_SCALE if normalize else x


def elatentlpips_terms(
    metric: ELatentLPIPS,
    x0: jax.Array,
    x1: jax.Array,
    *,
    key: jax.Array | None = None,
    normalize: bool = True,
    ensembling: bool = True,
    aug_params: AugmentParams | None = None,
) -> DistanceTerms:
    """Per-tap distances and the L1 term for NHWC latents (B, H, W, 4).

    normalize: multiply both inputs by 0.13025 first (meant for raw VAE latents; the Moebius
    trainer passes latents already scaled by 0.13025 with normalize=True, i.e. scales twice,
    and a faithful port keeps that).
    ensembling: one random transform per sample, drawn from `key`, shared by x0 and x1;
    `aug_params` replaces the draw with given parameters (replaying recorded transforms).
    The L1 term is taken on the scaled inputs before the augmentation, as in the reference.
    """
    x0, x1 = _prepare(x0, normalize), _prepare(x1, normalize)
    l1 = l1_distance(x0, x1)
    if ensembling:
        if aug_params is None:
            if key is None:
                raise ValueError("ensembling=True needs a PRNG `key` (or explicit `aug_params`)")
            aug_params = sample_params(key, x0.shape[0], x0.shape[1], x0.shape[2])
        x0, x1 = augment_pair(aug_params, x0, x1)
    variables = jax.lax.stop_gradient(metric.variables)  # a frozen metric: gradients reach the inputs only
    return DistanceTerms(metric.network.apply(variables, x0, x1), l1)


def elatentlpips_distance(
    metric: ELatentLPIPS,
    x0: jax.Array,
    x1: jax.Array,
    *,
    key: jax.Array | None = None,
    normalize: bool = True,
    ensembling: bool = True,
    add_l1: bool = True,
    aug_params: AugmentParams | None = None,
) -> jax.Array:
    """E-LatentLPIPS distance per sample, shape (B,); the trainer's loss is its mean.

    Same arguments as `elatentlpips_terms`; `add_l1` adds the L1 term (the reference default).
    Each call makes exactly one random draw per sample; the "ensemble" forms across steps.
    """
    terms = elatentlpips_terms(
        metric, x0, x1, key=key, normalize=normalize, ensembling=ensembling, aug_params=aug_params
    )
    return terms.total(add_l1)


def elatentlpips_features(metric: ELatentLPIPS, x: jax.Array, *, normalize: bool = True) -> list[jax.Array]:
    """The five unit-normalised taps of one NHWC batch (no augmentation), for inspection."""
    v = metric.variables
    trunk = {"params": v["params"]["net"], "batch_stats": v["batch_stats"]["net"]}
    return [unit_normalize(t) for t in LatentVGG16BN(metric.widths).apply(trunk, _prepare(x, normalize))]
