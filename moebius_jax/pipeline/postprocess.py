"""Post-processing of the reference pipeline and our paste at original size.

The reference stops at the resized multiple-of-64 image: :func:`to_uint8`, then :func:`paste`
(or :func:`paste_compensate`) against the resized input, reproduced bit for bit, Pillow blur
included. Our default output, :func:`paste_back_to_original`, instead upsamples the result to
the input's own size and blends it into the untouched input, so nothing away from the mask
changes. Arrays are HWC uint8 unless said otherwise.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
from PIL import Image, ImageFilter

PASTE_BLUR_RADIUS = 3.0
COMPENSATE_FACTOR = 1.1
COMPENSATE_RING_OFFSET = 10
# compensate's hole is mask > 128 (strict), unlike the ≥ 128 of pre-processing.
_COMPENSATE_THRESHOLD = 128


def to_uint8(decoded_01, xp: ModuleType = np):
    """Clamp to [0, 1], scale by 255 in float32 and truncate, as the reference does; any shape.

    float32 as in the reference (a float64 product can land on the other side of an integer);
    NaN becomes 0. `xp` is numpy or jax.numpy (the exported program ends with it).
    """
    x = xp.nan_to_num(xp.asarray(decoded_01, dtype=xp.float32), nan=0.0)
    return (xp.clip(x, 0.0, 1.0) * xp.float32(255)).astype(xp.uint8)


def blurred_mask(mask_u8: np.ndarray, radius: float = PASTE_BLUR_RADIUS) -> np.ndarray:
    """(H, W, 3) uint8 Pillow ``GaussianBlur(radius)`` of an (H, W) L mask converted to RGB."""
    mask = Image.fromarray(np.asarray(mask_u8, dtype=np.uint8)).convert("RGB")
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)))


def paste(result_u8: np.ndarray, original_u8: np.ndarray, mask_u8: np.ndarray) -> np.ndarray:
    """The reference's paste: blend result into original with the radius-3 blurred mask."""
    _check_rgb_u8(result_u8, original_u8)
    return _blend(np.asarray(result_u8, dtype=np.float64) / 255,
                  np.asarray(original_u8), blurred_mask(mask_u8))


def compensation_ring(hole: np.ndarray, off: int = COMPENSATE_RING_OFFSET) -> np.ndarray:
    """(H, W) bool: the hole's bounding box grown by ``off`` around its centre, minus the hole.

    The reference's get_bbox_unmask: an empty hole counts as a box over the whole image.
    """
    hole = np.asarray(hole, dtype=bool)
    height, width = hole.shape
    rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
    min_r, max_r = (rows[0], rows[-1]) if rows.size else (0, height - 1)
    min_c, max_c = (cols[0], cols[-1]) if cols.size else (0, width - 1)
    half_h = (max_r - min_r + 1 + off) // 2
    half_w = (max_c - min_c + 1 + off) // 2
    centre_r, centre_c = (min_r + max_r) // 2, (min_c + max_c) // 2
    box = np.zeros_like(hole, dtype=bool)
    box[max(0, centre_r - half_h):min(height - 1, centre_r + half_h) + 1,
        max(0, centre_c - half_w):min(width - 1, centre_c + half_w) + 1] = True
    return box & ~hole


def paste_compensate(
    result_u8: np.ndarray,
    original_u8: np.ndarray,
    mask_u8: np.ndarray,
    fac: float = COMPENSATE_FACTOR,
    off: int = COMPENSATE_RING_OFFSET,
) -> np.ndarray:
    """The reference's colour-compensated paste: shift the result by ``fac`` × the mean colour
    gap (original − result) on a ring around the hole, then blend with the blurred hole."""
    _check_rgb_u8(result_u8, original_u8)
    hole = np.asarray(mask_u8) > _COMPENSATE_THRESHOLD
    shift = _ring_colour_shift(hole, original_u8, result_u8, off)
    weights = blurred_mask(hole.astype(np.uint8) * np.uint8(255))
    shifted = np.asarray(result_u8, dtype=np.float64) / 255 + fac * shift / 255
    return _blend(shifted, np.asarray(original_u8), weights, clip=True)


def paste_back_to_original(
    result_u8: np.ndarray,
    original_image: np.ndarray | Image.Image,
    hole: np.ndarray | Image.Image,
    radius: float = PASTE_BLUR_RADIUS,
    compensate: bool = False,
    fac: float = COMPENSATE_FACTOR,
) -> np.ndarray:
    """Our default output: the result upsampled (LANCZOS) to the input's size and pasted into
    the untouched input (RGB uint8) with the binary hole mask (uint8 0 / 255 as `load_pair`
    gives, or bool), blurred at that size.

    ``radius`` (and the compensation ring offset) are given at the model's resolution, like the
    reference's 3 px, and scaled by the resize factor (the larger of the two axes'), so the
    feather covers the same part of the picture as the reference's and is wide enough to hide
    the softness of an upsampled result. Pixels whose blurred weight is 0 — everything farther
    than the blur's reach from the mask — are byte-identical to the input; with an input that
    needed no resize this equals :func:`paste` / :func:`paste_compensate` on the binarised mask.
    """
    original_u8, hole_u8 = np.asarray(original_image), np.asarray(hole)
    if hole_u8.dtype == bool:
        hole_u8 = hole_u8.astype(np.uint8) * np.uint8(255)
    _check_rgb_u8(result_u8, original_u8)
    if hole_u8.shape != original_u8.shape[:2]:
        raise ValueError(f"mask size {hole_u8.shape[::-1]} differs from image size {original_u8.shape[1::-1]} (w, h)")
    result = np.asarray(result_u8)
    height, width = original_u8.shape[:2]
    scale = max(width / result.shape[1], height / result.shape[0])
    upsampled = np.asarray(Image.fromarray(result).resize((width, height), Image.Resampling.LANCZOS))
    weights = blurred_mask(hole_u8, radius * scale)
    if not compensate:
        return _blend(upsampled / 255.0, original_u8, weights)
    shift = _ring_colour_shift(hole_u8 > _COMPENSATE_THRESHOLD, original_u8, upsampled,
                               round(COMPENSATE_RING_OFFSET * scale))
    return _blend(upsampled / 255.0 + fac * shift / 255, original_u8, weights, clip=True)


def _check_rgb_u8(*arrays: np.ndarray) -> None:
    """Refuse anything but (H, W, 3) uint8: a float image would be cast silently to garbage."""
    for array in arrays:
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.shape} {array.dtype}")


def _ring_colour_shift(
    hole: np.ndarray, original_u8: np.ndarray, result_u8: np.ndarray, off: int
) -> np.ndarray:
    """(3,) float64 mean(original) − mean(result) over the ring, on the 0-255 scale; 0 when
    the ring is empty (the reference divides by zero there)."""
    ring = compensation_ring(hole, off)
    count = ring.sum()
    if count == 0:
        return np.zeros(3)
    original_mean = np.asarray(original_u8, dtype=np.float64)[ring].sum(axis=0) / count
    result_mean = np.asarray(result_u8, dtype=np.float64)[ring].sum(axis=0) / count
    return original_mean - result_mean


def _blend(
    result_01: np.ndarray, original_u8: np.ndarray, weights_u8: np.ndarray, clip: bool = False
) -> np.ndarray:
    """uint8_trunc((R·W + (1 − W)·O/255)·255) in float64, the reference's blend.

    Exact at W = 0 and W = 1: (k/255)·255 == k for every uint8 k.
    """
    weights = weights_u8 / 255.0
    blended = result_01 * weights + (1 - weights) * (original_u8 / 255.0)
    if clip:
        blended = np.clip(blended, 0.0, 1.0)
    return (blended * 255).astype(np.uint8)
