"""The "bg" geometric augmentation of E-LatentLPIPS as pure, differentiable JAX functions.

Each sample gets one random affine transform (x-flip, quarter turn, integer shift, isotropic
scale, rotation, anisotropic scale, rotation, fractional shift; all with probability 1), and
the same transform is applied to both inputs of the metric. Like the reference, every op,
even a flip, goes through one resampler: reflect pad, 2x upsample with a symlet-6 low-pass,
bilinear sampling, 2x downsample.

Randomness is split from application: `sample_params(key, ...)` draws the parameters,
`augment_pair(params, x0, x1)` is deterministic. The reference pads by a data-dependent
margin; here every image is reflect-padded by the largest margin it could use and masked
to the window the reference would have padded (spec README section 3d), which gives the
same result with static shapes, so it jits and vmaps. NHWC throughout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The augment pipe's settings for "bg" (strength p = 1).
XINT_MAX = 0.125  # integer shift: up to 1/8 of the size
SCALE_STD = 0.2  # log2 std of the isotropic scale
ROTATE_MAX = 1.0  # rotations up to +-pi * ROTATE_MAX
ANISO_STD = 0.2  # log2 std of the anisotropic scale
XFRAC_STD = 0.125  # fractional shift std, in units of the size

# Symlet-6 low-pass decomposition filter divided by its float32 sum (exact float32 values).
SYM6_FILTER = np.array(
    [0.0108923493, 0.00246830587, -0.0834316015, -0.0341615602, 0.347228944, 0.556946397,
     0.238952175, -0.051362481, -0.014891874, 0.0316252783, 0.00124996097, -0.0055159335],
    np.float32,
)
# Border the reference adds around the output canvas: two filter supports at half resolution.
FILTER_MARGIN = 2 * (len(SYM6_FILTER) // 4)

# The reference's draws per sample, in its order: flip U, rot90 U, xint U[2], scale N,
# rot_pre U, aniso N, rot_post U, xfrac N[2] (U uniform [0, 1), N standard normal). Each is
# followed by a uniform "gate" `{name}_gate` that enables the op when below the strength p = 1,
# so with p = 1 a gate only consumes random numbers.
DRAW_NAMES = ("flip", "rot90", "xint", "scale", "rot_pre", "aniso", "rot_post", "xfrac")


class AugmentParams(NamedTuple):
    """Per-sample transform parameters (float32, leading axis B); (x, y) pairs are along (W, H)."""

    flip: jax.Array  # (B,) 1 = mirror along x
    rot90: jax.Array  # (B,) quarter turns in {0, 1, 2, 3}
    xint_px: jax.Array  # (B, 2) integer shift in pixels
    scale: jax.Array  # (B,) isotropic scale
    rot_pre: jax.Array  # (B,) radians
    aniso: jax.Array  # (B,) anisotropic scale (x by a, y by 1/a)
    rot_post: jax.Array  # (B,) radians
    xfrac_px: jax.Array  # (B, 2) fractional shift in pixels


def params_from_draws(draws: Mapping[str, jax.Array], height: int, width: int) -> AugmentParams:
    """The reference's mapping from its draws (named as in DRAW_NAMES) to parameters.

    Gates (`{name}_gate`) are optional and default to on; a gate value of 1.0, which is never
    drawn, switches its op off, which is how the fixtures isolate single ops.
    """
    d = {name: jnp.asarray(draws[name], jnp.float32) for name in DRAW_NAMES}
    on = {name: jnp.asarray(draws.get(f"{name}_gate", 0.0)) < 1.0 for name in DRAW_NAMES}
    size = jnp.array([width, height], jnp.float32)
    angle = np.float32(np.pi * ROTATE_MAX)
    xint = jnp.where(on["xint"], (d["xint"] * 2 - 1) * XINT_MAX, 0.0)
    xfrac = jnp.where(on["xfrac"], d["xfrac"] * XFRAC_STD, 0.0)
    return AugmentParams(
        flip=jnp.where(on["flip"], jnp.floor(d["flip"] * 2), 0.0),
        rot90=jnp.where(on["rot90"], jnp.floor(d["rot90"] * 4), 0.0),
        xint_px=jnp.round(xint * size),  # half to even, as torch.round
        scale=jnp.where(on["scale"], jnp.exp2(d["scale"] * SCALE_STD), 1.0),
        rot_pre=jnp.where(on["rot_pre"], (d["rot_pre"] * 2 - 1) * angle, 0.0),
        aniso=jnp.where(on["aniso"], jnp.exp2(d["aniso"] * ANISO_STD), 1.0),
        rot_post=jnp.where(on["rot_post"], (d["rot_post"] * 2 - 1) * angle, 0.0),
        xfrac_px=xfrac * size,
    )


def sample_params(key: jax.Array, batch: int, height: int, width: int) -> AugmentParams:
    """Independent random parameters for `batch` samples, drawn from `key` only.

    The gates are not drawn (with p = 1 they always pass), and all uniforms and all normals
    come from one array each, which compiles much faster than one draw per op.
    """
    key_u, key_n = jax.random.split(key)
    u = jax.random.uniform(key_u, (batch, 6), jnp.float32)
    z = jax.random.normal(key_n, (batch, 4), jnp.float32)
    draws = {
        "flip": u[:, 0], "rot90": u[:, 1], "xint": u[:, 2:4], "rot_pre": u[:, 4], "rot_post": u[:, 5],
        "scale": z[:, 0], "aniso": z[:, 1], "xfrac": z[:, 2:4],
    }
    return params_from_draws(draws, height, width)


# ------------------------------------------------------------------------------- matrices


def _mat(rows: list[list[jax.Array | float]]) -> jax.Array:
    """(B, 3, 3) from nested rows of (B,) arrays or scalars."""
    batch = jnp.broadcast_shapes(*(jnp.shape(v) for row in rows for v in row))
    entry = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), batch)  # noqa: E731
    return jnp.stack([jnp.stack([entry(v) for v in row], -1) for row in rows], -2)


def _translate(tx: jax.Array, ty: jax.Array) -> jax.Array:
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def _scale(sx: jax.Array, sy: jax.Array) -> jax.Array:
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _rotate(phi: jax.Array) -> jax.Array:
    c, s = jnp.cos(phi), jnp.sin(phi)
    return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _chain(*mats: jax.Array) -> jax.Array:
    """Left-to-right float32 product, the reference's evaluation order."""
    out = mats[0]
    for m in mats[1:]:
        out = jnp.matmul(out, m, precision=jax.lax.Precision.HIGHEST)
    return out


def inverse_matrix(params: AugmentParams) -> jax.Array:
    """(B, 3, 3) map from output to input pixel coordinates (origin at the image centre, y down)."""
    p = params
    return _chain(
        _scale(1 / (1 - 2 * p.flip), 1.0),
        _rotate(np.float32(np.pi / 2) * p.rot90),
        _translate(-p.xint_px[:, 0], -p.xint_px[:, 1]),
        _scale(1 / p.scale, 1 / p.scale),
        _rotate(p.rot_pre),
        _scale(1 / p.aniso, p.aniso),
        _rotate(p.rot_post),
        _translate(-p.xfrac_px[:, 0], -p.xfrac_px[:, 1]),
    )


def margins(g: jax.Array, height: int, width: int) -> jax.Array:
    """The reference's padding [left, top, right, bottom] before its ceil: one set for the batch,
    wide enough that every sample's transformed corners plus the filter support stay inside."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = jnp.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], jnp.float32)
    pts = jnp.einsum("bij,kj->bki", g, corners, precision=jax.lax.Precision.HIGHEST)[..., :2].reshape(-1, 2)
    m = jnp.concatenate([jnp.max(-pts, axis=0), jnp.max(pts, axis=0)])
    m = m + jnp.array([FILTER_MARGIN - cx, FILTER_MARGIN - cy] * 2, jnp.float32)
    return jnp.clip(m, 0.0, jnp.array([width - 1, height - 1] * 2, jnp.float32))


def sampling_theta(g: jax.Array, pad: tuple[int, int, int, int], height: int, width: int) -> jax.Array:
    """(B, 2, 3) affine_grid matrix for an image reflect-padded by `pad` = (left, top, right,
    bottom) and upsampled 2x, producing the 2x output canvas 2 (H + FILTER_MARGIN) x 2 (W + FILTER_MARGIN)."""
    x0, y0, x1, y1 = pad
    up_h, up_w = 2 * (height + y0 + y1), 2 * (width + x0 + x1)
    out_h, out_w = 2 * (height + FILTER_MARGIN), 2 * (width + FILTER_MARGIN)
    g = _chain(_translate(jnp.float32((x0 - x1) / 2), jnp.float32((y0 - y1) / 2)), g)  # re-centre
    g = _chain(_scale(2.0, 2.0), g, _scale(0.5, 0.5))  # pixels of the 2x images
    g = _chain(_translate(-0.5, -0.5), g, _translate(0.5, 0.5))  # pixel centres
    g = _chain(_scale(2 / up_w, 2 / up_h), g, _scale(out_w / 2, out_h / 2))  # normalised coordinates
    return g[:, :2, :]


# ------------------------------------------------------------------------------- resampler


def _fir(
    x: jax.Array, taps: np.ndarray, axis: int, *, stride: int = 1, dilation: int = 1, pad: tuple[int, int] = (0, 0)
) -> jax.Array:
    """Depthwise 1-D correlation of NHWC `x` along `axis` (1 = H, 2 = W); `dilation` inserts
    zeros between input samples, `pad` adds zeros at both ends (after the insertion)."""
    channels = x.shape[-1]

    def along(value, other):  # (H, W) pair with `value` on the filtered axis
        return (value, other) if axis == 1 else (other, value)

    kernel = jnp.asarray(taps, x.dtype).reshape(*along(len(taps), 1), 1, 1)
    return jax.lax.conv_general_dilated(
        x,
        jnp.broadcast_to(kernel, (*kernel.shape[:3], channels)),
        window_strides=along(stride, 1),
        padding=along(pad, (0, 0)),
        lhs_dilation=along(dilation, 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )


def upsample2x(x: jax.Array) -> jax.Array:
    """Zero-insertion 2x upsampling with the filter (gain 2 per axis), W then H:
    y[j] = sum_k 2 f[k] z[j + 5 - k] with z the zero-stuffed input."""
    taps = 2 * SYM6_FILTER[::-1]  # a true convolution: correlate with the flipped filter
    half = len(taps) // 2
    for axis in (2, 1):
        x = _fir(x, taps, axis, dilation=2, pad=(half, half))
    return x


def downsample2x(x: jax.Array) -> jax.Array:
    """Filter and keep every second sample, W then H: y[q] = sum_k f[k] x[2q + 1 + k]."""
    for axis in (2, 1):
        x = _fir(jax.lax.slice_in_dim(x, 1, None, axis=axis), SYM6_FILTER, axis, stride=2)
    return x


def affine_grid(theta: jax.Array, height: int, width: int) -> jax.Array:
    """(B, H, W, 2) sampling points (x, y) in [-1, 1] units, pixel centres (align_corners=False)."""
    xs = (2 * jnp.arange(width, dtype=jnp.float32) + 1) / width - 1
    ys = (2 * jnp.arange(height, dtype=jnp.float32) + 1) / height - 1
    base = jnp.stack([*jnp.meshgrid(xs, ys), jnp.ones((height, width), jnp.float32)], -1)
    return jnp.einsum("hwk,bik->bhwi", base, theta, precision=jax.lax.Precision.HIGHEST)


def grid_sample(image: jax.Array, grid: jax.Array) -> jax.Array:
    """Bilinear sampling of NHWC `image` at `grid` (B, Ho, Wo, 2); outside pixels count as 0
    (torch grid_sample, padding "zeros", align_corners=False)."""
    b, h, w, _ = image.shape
    ix = ((grid[..., 0] + 1) * w - 1) / 2
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    batch = jnp.arange(b)[:, None, None]

    def tap(yy: jax.Array, xx: jax.Array, weight: jax.Array) -> jax.Array:
        inside = (xx >= 0) & (xx <= w - 1) & (yy >= 0) & (yy <= h - 1)
        values = image[batch, jnp.clip(yy, 0, h - 1).astype(jnp.int32), jnp.clip(xx, 0, w - 1).astype(jnp.int32)]
        return values * jnp.where(inside, weight, 0.0)[..., None]

    return (
        tap(y0, x0, (x1 - ix) * (y1 - iy))
        + tap(y0, x1, (ix - x0) * (y1 - iy))
        + tap(y1, x0, (x1 - ix) * (iy - y0))
        + tap(y1, x1, (ix - x0) * (iy - y0))
    )


def _window(n: int, start: jax.Array, stop: jax.Array) -> jax.Array:
    """1.0 on [start, stop) of range(n), else 0.0: a data-dependent window on a static axis."""
    idx = jnp.arange(n)
    return ((idx >= start) & (idx < stop)).astype(jnp.float32)


def apply_transform(g: jax.Array, x: jax.Array) -> jax.Array:
    """Resample NHWC `x` (B, H, W, C) through the per-sample inverse matrices `g` (B, 3, 3).

    Static-shape form of the reference: reflect-pad by the maximum (W-1, H-1) on every side,
    then zero everything outside the window the reference pads (its batch-wide margins), before
    and after the upsampler, so filter taps and bilinear neighbours see exactly what they see
    in the reference.
    """
    _, height, width, _ = x.shape
    px, py = width - 1, height - 1
    mx0, my0, mx1, my1 = jnp.ceil(margins(g, height, width))
    x = jnp.pad(x, ((0, 0), (py, py), (px, px), (0, 0)), mode="reflect")

    def mask(z: jax.Array, factor: int) -> jax.Array:
        rows = _window(z.shape[1], factor * (py - my0), factor * (py + height + my1))
        cols = _window(z.shape[2], factor * (px - mx0), factor * (px + width + mx1))
        return z * (rows[:, None] * cols[None, :])[None, :, :, None]

    x = mask(upsample2x(mask(x, 1)), 2)
    theta = sampling_theta(g, (px, py, px, py), height, width)
    grid = affine_grid(theta, 2 * (height + FILTER_MARGIN), 2 * (width + FILTER_MARGIN))
    return downsample2x(grid_sample(x, grid))


def augment_pair(params: AugmentParams, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Apply the same per-sample transform to both NHWC batches (they go through as one)."""
    channels = x0.shape[-1]
    g = jax.lax.stop_gradient(inverse_matrix(params))
    out = apply_transform(g, jnp.concatenate([x0, x1], axis=-1))
    return out[..., :channels], out[..., channels:]
