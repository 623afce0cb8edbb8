"""pytorch-fid's FID Inception network (up to pool3) in Flax, NHWC.

This is the network pytorch-fid 0.3.0 builds for FID, not torchvision's Inception3: its
A, C and E_1 blocks average-pool without counting the zero padding, Mixed_7c pools with
max instead of average, BatchNorm uses eps 1e-3, and the input is resized to 299x299 with
bilinear interpolation *without* antialiasing and then scaled by 2x - 1. Module names follow
the weight file (`Mixed_5b.branch1x1.conv`, ...), so the key map is a plain rename.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INCEPTION_SIZE = 299
POOL3_DIMS = 2048

# Convolutions at full float32 precision: the GPU/TPU default runs TF32/bf16 passes (about
# 1e-3 relative per conv), far from the float32 features pytorch-fid produces.
_HIGHEST = jax.lax.Precision.HIGHEST


def resize_for_inception(images: jnp.ndarray) -> jnp.ndarray:
    """(N, H, W, 3) -> (N, 299, 299, 3) the way pytorch-fid resizes: bilinear, half-pixel
    centres, no antialiasing (so downsampling mixes only 2x2 neighbours). Non-square images
    are stretched."""
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, INCEPTION_SIZE, INCEPTION_SIZE, c), "linear", antialias=False)


class _EvalBatchNorm(nn.Module):
    """Inference-only BatchNorm: the metric network never trains, so no counter is kept and
    files with or without `num_batches_tracked` load alike."""

    epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
        var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32).value
        return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm with running statistics (eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        return nn.relu(_EvalBatchNorm(name="bn")(x))


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
    """3x3 stride-1 average pool; border windows divide by the pixels they cover (FID variant)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 5x5 | double 3x3 | avg pool (padding excluded) + 1x1."""

    pool_features: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3 s2 | double 3x3 with s2 | max pool."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | 1x7,7x1 | 7x1,1x7,7x1,1x7 | avg pool (padding excluded) + 1x1."""

    channels_7x7: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c7 = self.channels_7x7
        conv = functools.partial(BasicConv2d, precision=self.precision)
        row = functools.partial(conv, kernel=(1, 7), padding=(0, 3))  # "1x7"
        col = functools.partial(conv, kernel=(7, 1), padding=(3, 0))  # "7x1"
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = row(c7, name="branch7x7_2")(b7)
        b7 = col(192, name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = col(c7, name="branch7x7dbl_2")(bd)
        bd = row(c7, name="branch7x7dbl_3")(bd)
        bd = col(c7, name="branch7x7dbl_4")(bd)
        bd = row(192, name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1,3x3 s2 | 1x1,1x7,7x1,3x3 s2 | max pool."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool, padding excluded) and Mixed_7c (`max_pool=True`, FID_E_2):
    1x1 | 1x1 -> (1x3 | 3x1) | 1x1,3x3 -> (1x3 | 3x1) | pool + 1x1."""

    max_pool: bool = False
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        row = functools.partial(conv, 384, (1, 3), padding=(0, 1))  # "1x3"
        col = functools.partial(conv, 384, (3, 1), padding=(1, 0))  # "3x1"
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([row(name="branch3x3_2a")(b3), col(name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([row(name="branch3x3dbl_3a")(bd), col(name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:  # -inf padding: the padding never wins
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """(N, H, W, 3) images in [0, 1] -> (N, 2048) pool3 features, as pytorch-fid's
    InceptionV3([3]) computes them (resize and 2x - 1 inside).

    Block outputs are sown into the "intermediates" collection under pytorch-fid's block
    names (block0: 64 ch, block1: 192, block2: 768) plus mixed_5b and mixed_7c, so parity
    tests can inspect them with `mutable=["intermediates"]`; a plain apply skips them.
    """

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        p = self.precision
        x = 2.0 * resize_for_inception(images.astype(jnp.float32)) - 1.0
        x = BasicConv2d(32, (3, 3), stride=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        self.sow("intermediates", "block0", x)
        x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        self.sow("intermediates", "block1", x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        self.sow("intermediates", "mixed_5b", x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, precision=p, name=name)(x)
        self.sow("intermediates", "block2", x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        self.sow("intermediates", "mixed_7c", x)
        return jnp.mean(x, axis=(1, 2))  # pool3: global average over the 8x8 grid
