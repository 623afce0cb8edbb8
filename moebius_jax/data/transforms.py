"""Per-sample preprocessing of the reference's training data, on the CPU.

:func:`prepare_sample` turns one source item into ``image`` (S, S, 3) float32 in [-1, 1],
``mask`` (S, S, 1) float32 in [0, 1] (1 = hole) and ``input_ids`` (10,) int32, and
:func:`collate` stacks samples into a batch with the binarised mask and the masked image.

Every random choice is drawn, in the spec's order, from the one ``numpy.random.Generator``
passed in (the loader derives it from the seed, epoch and record), never from a global RNG:
the reference's Python / NumPy / torch global draws become draws from that generator, so the
distribution is the reference's and the stream is reproducible.

Draw order per sample: [background] hole-source draw, LaMa mask draws if used, and only with
``use_extra_fg_mask`` the extra-mask draw and its index; then the dilation draw (k, iterations
if dilating); the crop offset; the flip.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from moebius_jax.data.masks import MaskGeneratorConfig, generate_mask
from moebius_jax.data.sources import DataSourceError, ImageRef, Item
from moebius_jax.latents import task_ids

logger = logging.getLogger(__name__)

DILATE_PROBA = 0.99
# What can go wrong decoding a file; anything else (a bug, a bad source) is not retried.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ItemSource(Protocol):
    """What :func:`prepare_sample` needs from a source (see :mod:`moebius_jax.data.sources`)."""

    foreground_masks: Sequence[ImageRef]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Item: ...


# --------------------------------------------------------------------------------------------
# Images


def open_image(ref: ImageRef, mode: str) -> Image.Image:
    """A fully decoded Pillow image in ``mode`` ("RGB" or "L") from a file or encoded bytes."""
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
        return image.convert(mode)  # convert() decodes everything before the file closes


def describe(ref: ImageRef) -> str:
    """A file's path, or the size of encoded bytes, for messages."""
    return f"<{len(ref)} encoded bytes>" if isinstance(ref, bytes) else str(ref)


def resize_short_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """torchvision ``Resize(size)`` on PIL: short side -> size, long -> int(size·long/short)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, resample)


def image_to_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 -> float32 (H, W, 3) in [-1, 1], as 2·u8/255 − 1 in float32."""
    return np.asarray(image, dtype=np.float32) / np.float32(255) * np.float32(2) - np.float32(1)


# --------------------------------------------------------------------------------------------
# Masks (uint8, 255 = hole, until the final scaling)


def load_mask(ref: ImageRef, width: int, height: int) -> np.ndarray:
    """A mask file as uint8 (height, width): grey levels kept, resized with PIL's BICUBIC."""
    return np.asarray(open_image(ref, "L").resize((width, height), Image.Resampling.BICUBIC))


def dilate(mask: np.ndarray, kernel: int, iterations: int) -> np.ndarray:
    """``cv2.dilate(mask, ones((kernel, kernel)), iterations=iterations)`` for a uint8 mask.

    Dilation by a flat square is a moving maximum. OpenCV anchors the square at index
    kernel // 2 (so for an even size the window reaches one pixel further up and left) and
    lets no outside pixel count; scipy's filter has the same anchor, and padding with 0,
    uint8's minimum, never raises a maximum. Iterating is what OpenCV's ``iterations`` does.
    """
    for _ in range(iterations):
        mask = ndimage.maximum_filter(np.asarray(mask, dtype=np.uint8), size=kernel, mode="constant", cval=0)
    return mask


def background_mask(
    item: Item,
    foreground_masks: Sequence[ImageRef],
    rng: np.random.Generator,
    height: int,
    width: int,
    mask_config: MaskGeneratorConfig,
    use_extra_fg_mask: bool,
) -> np.ndarray:
    """§3.3 background: a LaMa mask or (p = 0.5, if any) the item's mask, optionally ANDed."""
    if rng.random() < 0.5 or item.mask is None:
        mask = generate_mask(mask_config, rng, height, width)
    else:
        mask = load_mask(item.mask, width, height)
    if use_extra_fg_mask and rng.random() < 0.5:
        extra = foreground_masks[int(rng.integers(0, len(foreground_masks)))]
        # The reference's cv2.bitwise_and on the grey levels: a hole only where both have one.
        mask = np.bitwise_and(mask, load_mask(extra, width, height))
    return mask


def random_dilate(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """§3.4: with p = 0.99 dilate by a k×k square, k ∈ {3, 5, 7}, 1 or 2 times."""
    if rng.random() < DILATE_PROBA:
        kernel = 2 * int(rng.integers(1, 4)) + 1
        iterations = int(rng.integers(1, 3))
        mask = dilate(mask, kernel, iterations)
    return mask


# --------------------------------------------------------------------------------------------
# Joint crop and flip


def mask_crop_range(hole: np.ndarray) -> tuple[int, int, int]:
    """``(axis, lo, hi)`` of RandomMaskCrop (§3.6): the square crop's offset along ``axis``
    (1 = columns for a landscape image, else 0 = rows) is drawn uniformly from [lo, hi).

    Without a hole the offset is uniform over all but the last valid one (the reference's
    exclusive bound); with one, it is chosen so the crop nearly always contains the centre of
    the hole's extent. The bounds are computed in float and truncated, as in the reference.
    """
    height, width = hole.shape
    side = min(height, width)
    axis = 1 if height < width else 0
    room = max(height, width) - side  # number of valid offsets minus one
    coords = np.nonzero(hole)[axis]
    if coords.size == 0:
        return axis, 0, max(room, 1)  # square: the only offset is 0
    first = int(coords.min())
    centre = first + 0.5 * (int(coords.max()) - first)
    lo = max(0, min(room - 1, centre - side))
    hi = max(lo + 1, min(room, centre))
    return axis, int(lo), int(hi)


def random_mask_crop(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same square crop (side min(H, W)) of image (H, W, 3) and mask (H, W, 1)."""
    axis, lo, hi = mask_crop_range(mask[..., 0] > 0.5)
    offset = int(rng.integers(lo, hi))
    side = min(mask.shape[:2])
    window = slice(offset, offset + side)
    crop = (slice(None), window) if axis == 1 else (window, slice(None))
    return image[crop], mask[crop]


def random_flip(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """RandomHorizontalFlip(0.5), applied to image and mask together."""
    if rng.random() < 0.5:
        return image[:, ::-1], mask[:, ::-1]
    return image, mask


# --------------------------------------------------------------------------------------------
# One sample, one batch


def _open_with_retry(source: ItemSource, index: int) -> tuple[Item, Image.Image]:
    """The item and its RGB image; if that fails, once, the next item (the reference's retry)."""
    item = source[index]
    try:
        return item, open_image(item.image, "RGB")
    except _IMAGE_ERRORS as first:
        following = (index + 1) % len(source)
        failed = f"{item.origin}: image {describe(item.image)}"
        logger.warning("%s cannot be opened (%s); using item %d instead", failed, first, following)
        item = source[following]
        try:
            return item, open_image(item.image, "RGB")
        except _IMAGE_ERRORS as second:
            raise DataSourceError(
                f"{failed} cannot be opened ({first}), nor can the next item's, "
                f"{item.origin}: image {describe(item.image)} ({second})"
            ) from second


def check_extra_fg_masks(source: ItemSource, use_extra_fg_mask: bool) -> None:
    """``use_extra_fg_mask`` draws from the source's foreground masks, so there must be some."""
    if use_extra_fg_mask and not source.foreground_masks:
        raise DataSourceError(
            f"use_extra_fg_mask needs foreground items with masks; {source!r} has none"
        )


def prepare_sample(
    source: ItemSource,
    index: int,
    rng: np.random.Generator,
    *,
    image_size: int,
    mask_config: MaskGeneratorConfig,
    use_extra_fg_mask: bool = False,
) -> dict[str, np.ndarray]:
    """Item ``index`` as image (S,S,3) f32, mask (S,S,1) f32 in [0,1], input_ids (10,) i32."""
    check_extra_fg_masks(source, use_extra_fg_mask)
    item, image = _open_with_retry(source, index)
    image = resize_short_side(image, image_size, Image.Resampling.LANCZOS)
    width, height = image.size
    if item.prompt == "foreground":
        if item.mask is None:
            raise DataSourceError(f"{item.origin}: a foreground item needs a mask")
        mask = load_mask(item.mask, width, height)
    else:
        mask = background_mask(
            item, source.foreground_masks, rng, height, width, mask_config, use_extra_fg_mask
        )
    mask = random_dilate(mask, rng)
    # Scaling commutes with the dilation's maximum, so dilating uint8 first is exact.
    mask = (mask / 255.0).astype(np.float32)[..., None]
    pixels, mask = random_mask_crop(image_to_array(image), mask, rng)
    pixels, mask = random_flip(pixels, mask, rng)
    return {
        "image": np.ascontiguousarray(pixels),
        "mask": np.ascontiguousarray(mask),
        "input_ids": task_ids(item.prompt),
    }


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack samples (§3.7): mask binarised at 0.5 (f32 {0, 1}), masked_image = image·(1−mask)."""
    image = np.stack([s["image"] for s in samples])
    mask = (np.stack([s["mask"] for s in samples]) >= 0.5).astype(np.float32)
    return {
        "image": image,
        "mask": mask,
        "masked_image": image * (np.float32(1) - mask),
        "input_ids": np.stack([s["input_ids"] for s in samples]),
    }
