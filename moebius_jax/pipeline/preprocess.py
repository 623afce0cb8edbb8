"""Per-image pre-processing of the reference pipeline, NHWC.

Host-side numpy/Pillow work, reproduced bit for bit: binarise the mask, resize image and mask
with LANCZOS so the short side is ``resolution`` and both sides are multiples of 64, then build
the float tensors the VAE and the UNet take. Sizes are PIL-style ``(width, height)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from moebius_jax import latents
from moebius_jax.pipeline.image_io import ImageSource, load_image, load_mask

# The UNet downsamples by 64 in total; the VAE alone by 8.
SIZE_MULTIPLE = 64
LATENT_DOWNSAMPLE = 8
# The reference's point LUT: v < 127.5 → 0, else 255 (so 128 and above become 255).
_BINARY_LUT = [0 if v < 127.5 else 255 for v in range(256)]


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


def prepare(image: ImageSource, mask: ImageSource, resolution: int = 512) -> Prepared:
    """Binarise, resize and convert one image/mask pair exactly as the reference's _preprocess."""
    image = load_image(image)
    mask = load_mask(mask)
    if image.size != mask.size:
        raise ValueError(f"mask size {mask.size} differs from image size {image.size} (w, h)")
    size = target_size(*image.size, resolution)
    # PIL returns a copy when the size is unchanged, so this is a no-op for such inputs.
    resized_image = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    resized_mask = np.asarray(binarize_mask(mask).resize(size, Image.Resampling.LANCZOS))

    # The reference divides in float64 and casts to float32 afterwards; the order matters for
    # the last bit.
    image_f = (resized_image / 255.0 * 2 - 1).astype(np.float32)
    mask_bin = ((resized_mask / 255.0).astype(np.float32) >= 0.5).astype(np.uint8)[..., None]
    # A product, not a select: negative pixels become -0.0 exactly as in the reference.
    masked_image = image_f * (1 - mask_bin)
    latent_mask = latents.latent_mask(mask_bin, LATENT_DOWNSAMPLE).astype(np.float32)

    arrays = dict(resized_image=resized_image, resized_mask=resized_mask, image=image_f,
                  mask=mask_bin, masked_image=masked_image, latent_mask=latent_mask)
    for array in arrays.values():
        array.flags.writeable = False
    return Prepared(**arrays, original_size=image.size, resized_size=size)


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
