"""Per-image pre-processing of the reference pipeline, NHWC.

Host-side numpy/Pillow work, reproduced bit for bit. :func:`load_pair` reads an image and its
mask once (any source), binarises the mask once and optionally dilates it; :func:`prepare`
resizes both with LANCZOS so the short side is ``resolution`` and both sides are multiples of
64, then :func:`model_arrays` builds the float tensors the VAE and the UNet take (also inside
the exported program, hence its array-namespace argument). Sizes are PIL-style ``(width, height)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np
from PIL import Image

from moebius_jax import latents
from moebius_jax.data.transforms import dilate
from moebius_jax.pipeline.image_io import ImageSource, load_image, load_mask

# The UNet downsamples by 64 in total; the VAE alone by 8.
SIZE_MULTIPLE = 64
LATENT_DOWNSAMPLE = 8
MIN_SIDE = 64  # one latent cell of the lowest UNet level; smaller inputs carry too little to inpaint
# The reference's point LUT: v < 127.5 → 0, else 255 (so 128 and above become 255).
_BINARY_LUT = [0 if v < 127.5 else 255 for v in range(256)]
# uint8 -> [-1, 1] as the reference computes it: in float64, then cast to float32. As a table,
# the same values come out of numpy and of a traced JAX program (which has no float64).
_PIXEL_TO_UNIT = (np.arange(256) / 255.0 * 2 - 1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One image ready for the model; arrays are read-only, NHWC without the batch axis.

    resized_image (H, W, 3) uint8 and resized_mask (H, W) uint8 (LANCZOS grey edges kept) are
    what the reference's paste step blends with; image / masked_image are float32 in [-1, 1],
    mask is uint8 {0, 1} (H, W, 1) as the reference stores it, latent_mask float32 {0, 1}
    (H/8, W/8, 1). Sizes are (width, height).
    """

    resized_image: np.ndarray
    resized_mask: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    masked_image: np.ndarray
    latent_mask: np.ndarray
    original_size: tuple[int, int]
    resized_size: tuple[int, int]


def binarize_mask(mask: Image.Image) -> Image.Image:
    """Threshold an L mask: ≥ 128 → 255, else 0, with the reference's point LUT."""
    return mask.point(_BINARY_LUT)


def hole_mask(mask: Image.Image, mask_dilate: int = 0) -> Image.Image:
    """The binarised L mask, dilated by a `mask_dilate` × `mask_dilate` square when > 0.

    The reference's `mask_dilate_kernel_size`: OpenCV's dilation by a square of ones, once, so
    the hole grows by `mask_dilate // 2` px on every side (for an even size, one pixel less
    towards the top and left).
    """
    if mask_dilate < 0:
        raise ValueError(f"mask_dilate must be >= 0 (0 = off), got {mask_dilate}")
    hole = binarize_mask(mask)
    if mask_dilate:
        hole = Image.fromarray(dilate(np.asarray(hole), mask_dilate, 1))
    return hole


def source_name(src: ImageSource) -> str:
    """How an image source is named in messages: its path, or its type."""
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def load_pair(image_src: ImageSource, mask_src: ImageSource, *, resize_mask: bool = False,
              mask_dilate: int = 0) -> tuple[Image.Image, Image.Image]:
    """(RGB image, binary L hole mask) from any sources: each loaded once, the mask binarised
    once (and dilated, see :func:`hole_mask`). Everything downstream takes these two.

    Raises ValueError naming the file for an image under `MIN_SIDE` px or a mask of another
    size (unless `resize_mask`: nearest-neighbour resized to the image).
    """
    image, mask = load_image(image_src), load_mask(mask_src)
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"image {source_name(image_src)} is {image.size[0]}x{image.size[1]}; "
                         f"both sides must be at least {MIN_SIDE} px")
    if mask.size != image.size:
        if not resize_mask:
            raise ValueError(
                f"image {source_name(image_src)} is {image.size[0]}x{image.size[1]} but its mask "
                f"{source_name(mask_src)} is {mask.size[0]}x{mask.size[1]}; pass resize_mask=True to resize it")
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    return image, hole_mask(mask, mask_dilate)


def target_size(width: int, height: int, resolution: int = 512) -> tuple[int, int]:
    """(w_t, h_t): short side scaled to ``resolution`` (int() truncation), each floored to 64.

    Raises ValueError when a side ends below 64 px, where the UNet cannot run.
    """
    if width < height:
        w_t, h_t = resolution, int(height * (resolution / width))
    else:
        w_t, h_t = int(width * (resolution / height)), resolution
    w_t, h_t = (w_t // SIZE_MULTIPLE) * SIZE_MULTIPLE, (h_t // SIZE_MULTIPLE) * SIZE_MULTIPLE
    if w_t < SIZE_MULTIPLE or h_t < SIZE_MULTIPLE:
        raise ValueError(
            f"image of {width}x{height} at resolution {resolution} resizes to {w_t}x{h_t}; "
            f"both sides must be at least {SIZE_MULTIPLE} px")
    return w_t, h_t


def prepare(image: Image.Image, hole: Image.Image, resolution: int = 512) -> Prepared:
    """Resize and convert one pair from :func:`load_pair` exactly as the reference's _preprocess."""
    if image.size != hole.size:
        raise ValueError(f"mask size {hole.size} differs from image size {image.size} (w, h)")
    size = target_size(*image.size, resolution)
    # PIL returns a copy when the size is unchanged, so this is a no-op for such inputs.
    resized_image = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    resized_mask = np.asarray(hole.resize(size, Image.Resampling.LANCZOS))
    image_f, mask_bin, masked_image, latent_mask = model_arrays(resized_image, resized_mask)
    arrays = dict(resized_image=resized_image, resized_mask=resized_mask, image=image_f,
                  mask=mask_bin, masked_image=masked_image, latent_mask=latent_mask)
    for array in arrays.values():
        array.flags.writeable = False
    return Prepared(**arrays, original_size=image.size, resized_size=size)


def model_arrays(image_u8, mask_u8, xp: ModuleType = np) -> tuple:
    """(image, mask, masked_image, latent_mask) from uint8 (..., H, W, 3) pixels and (..., H, W)
    mask levels, as the reference computes them; `xp` is numpy or jax.numpy.

    image float32 in [-1, 1]; mask uint8 {0, 1} (..., H, W, 1); masked_image float32;
    latent_mask float32 {0, 1} (..., H/8, W/8, 1).
    """
    image = xp.asarray(_PIXEL_TO_UNIT)[image_u8]
    # The reference's `mask / 255 >= 0.5` (float64 division) holds exactly for levels >= 128.
    mask = (mask_u8 >= 128).astype(xp.uint8)[..., None]
    # A product, not a select: negative pixels become -0.0 exactly as in the reference.
    masked_image = image * (1 - mask)
    latent_mask = latents.latent_mask(mask, LATENT_DOWNSAMPLE).astype(xp.float32)
    return image, mask, masked_image, latent_mask


def batch_prepared(items: Sequence[Prepared]) -> dict[str, np.ndarray]:
    """Stack prepared images into (B, ...) arrays; all must share one resized size.

    Keys are the array fields of :class:`Prepared` plus ``original_size`` and ``resized_size``
    as (B, 2) int64 (width, height).
    """
    if not items:
        raise ValueError("cannot batch an empty list of prepared images")
    sizes = sorted({item.resized_size for item in items})
    if len(sizes) > 1:
        raise ValueError(f"prepared images have different resized sizes {sizes} (w, h)")
    batch = {
        field.name: np.stack([getattr(item, field.name) for item in items])
        for field in dataclasses.fields(Prepared)
    }
    batch["original_size"] = batch["original_size"].astype(np.int64)
    batch["resized_size"] = batch["resized_size"].astype(np.int64)
    return batch
