"""Loading user images and masks into the two forms the pipeline works on: 8-bit RGB and 8-bit L.

Sources may be a file path, a PIL image or a numpy array. The reference simply does
``Image.open(p).convert("RGB")`` / ``.convert("L")``; for the inputs it was run on (8-bit RGB
images, 8-bit L masks) we give the same pixels, and we define what happens for the rest:

* **EXIF orientation** is applied (``ImageOps.exif_transpose``) to files and PIL images, so the
  picture is upright as viewers show it; image and mask get the same treatment.
* **16-bit data** (``I;16*`` modes, 16-bit PNGs, ``uint16`` arrays) is scaled to 8 bits with
  rounding, ``round(v · 255 / 65535)``, instead of Pillow's clipping at 255 (which turns
  almost every 16-bit image white). Mode ``I`` (32-bit int) is read on the same 16-bit scale,
  since in Pillow it nearly always comes from a 16-bit file; values outside [0, 65535] clip.
  (16-bit *colour* files are reduced to 8-bit RGB by Pillow's decoder itself.)
* **Float data** (mode ``F``, float arrays) is read as [0, 1]; values slightly outside are
  clipped, but anything above 1.5 or below -0.5 is refused as probable 0-255 data, and NaN or
  infinity is refused.
* **Images with alpha** (RGBA, LA, PA, P with transparency) keep their colour and lose the alpha,
  as the reference's ``.convert("RGB")`` does. CMYK, YCbCr, LAB, HSV go through Pillow's
  ``convert("RGB")`` (no ICC colour management).
* **Masks** (255 = region to inpaint) are reduced to one channel as follows:
  - L and 1: as they are (1 → 0/255);
  - colour without alpha: the per-pixel maximum over R, G, B. For grey masks this is exactly
    what ``convert("L")`` gives; for a coloured stroke on black it keeps the stroke (luma would
    put pure red at 76 and pure blue at 29, below the 128 threshold);
  - with alpha: when the colour is constant over the image and the alpha varies, the alpha *is*
    the mask (e.g. one flat colour painted on a transparent layer); otherwise the colour
    (maximum over channels) composited on black, ``colour · alpha / 255`` rounded, so
    transparent pixels mean "keep".

Unreadable input raises :class:`ImageLoadError` (a ``ValueError``) naming the source and the
reason. Files are only opened for reading; the returned image never shares memory with the
source.
"""

from __future__ import annotations

import os
import struct
import numpy as np
from PIL import Image, ImageOps

from moebius_jax.errors import UserError

ImageSource = str | os.PathLike[str] | Image.Image | np.ndarray

# Float data is [0, 1]; beyond these bounds it is taken for 0-255 data passed by mistake.
_FLOAT_REFUSE_BELOW = -0.5
_FLOAT_REFUSE_ABOVE = 1.5
# What Pillow's decoders raise on broken files (plugins differ; truncation is OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error,
                  Image.DecompressionBombError)


class ImageLoadError(UserError):
    """An image or mask cannot be read or converted; the message names the source and why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot load {source}: {reason}")
        self.source = source
        self.reason = reason


def load_image(src: ImageSource) -> Image.Image:
    """Load ``src`` as an upright 8-bit RGB image (alpha dropped, as the reference does)."""
    name, image = _open(src)
    try:
        if image.mode != "RGB" and _has_alpha(image):
            # Via RGBA: same colours as a direct convert, without Pillow's palette warning.
            image = image.convert("RGBA")
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(name, f"cannot convert mode {image.mode} to RGB ({exc})") from exc


def load_mask(src: ImageSource) -> Image.Image:
    """Load ``src`` as an upright 8-bit L mask (255 = inpaint), by the module's colour rule."""
    name, image = _open(src)
    if image.mode in ("L", "1"):
        return image.convert("L")
    try:
        if _has_alpha(image):
            rgba = np.asarray(image.convert("RGBA"))
            return Image.fromarray(_mask_from_rgba(rgba))
        rgb = np.asarray(image.convert("RGB"))
    except ValueError as exc:
        raise ImageLoadError(name, f"cannot convert mode {image.mode} to a mask ({exc})") from exc
    return Image.fromarray(rgb.max(axis=-1))


def _has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band or a palette/colour key)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info


def _mask_from_rgba(rgba: np.ndarray) -> np.ndarray:
    """The alpha when it alone carries a shape, else the brightest channel composited on black."""
    colour = rgba[..., :3].max(axis=-1)
    alpha = rgba[..., 3]
    flat_colour = np.all(rgba[..., :3] == rgba[0, 0, :3])
    if flat_colour and alpha.min() != alpha.max():
        return alpha.copy()
    # Integer round of colour·alpha/255.
    return ((colour.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)


def _open(src: ImageSource) -> tuple[str, Image.Image]:
    """(name for messages, decoded upright image in an 8-bit mode) for any supported source."""
    if isinstance(src, np.ndarray):
        name = f"array of shape {src.shape} and dtype {src.dtype}"
        return name, _array_to_image(src, name)
    if isinstance(src, Image.Image):
        name = f"PIL image {getattr(src, 'filename', '') or '(in memory)'}"
        return name, _decode(src, name)
    if isinstance(src, (str, os.PathLike)):
        name = f"image file {os.fspath(src)!r}"
        try:
            with Image.open(src) as image:
                return name, _decode(image, name)
        except ImageLoadError:
            raise
        except _DECODE_ERRORS as exc:
            raise ImageLoadError(name, _reason(exc)) from exc
    raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(src).__name__}")


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Force decoding, apply EXIF orientation and bring high-bit modes down to 8 bits."""
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)  # a new image: the source stays untouched
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(name, _reason(exc)) from exc
    if upright.mode.startswith("I;16") or upright.mode in ("I", "F"):
        data = np.asarray(upright)
        if upright.mode == "I":
            data = np.clip(data, 0, 65535).astype(np.uint16)
        return _array_to_image(data, name)
    return upright


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """8-bit L / RGB / RGBA image from an HW, HW1, HW3 or HW4 bool, uint8, uint16, float array."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(name, "expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if min(array.shape[:2]) == 0:
        raise ImageLoadError(name, "the image is empty")
    # Pillow reads (H, W) / (H, W, 3) / (H, W, 4) uint8 as L / RGB / RGBA.
    return Image.fromarray(_to_uint8(array, name))


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Scale bool / uint8 / uint16 / float [0, 1] data to uint8 (rounding, not clipping)."""
    kind, size = array.dtype.kind, array.dtype.itemsize  # byte order does not matter
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind == "u" and size == 1:
        return array.astype(np.uint8, order="C", copy=True)
    if kind == "u" and size == 2:
        # round(v·255/65535) in integers: exact, and 257·k maps back to k.
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if kind == "f":
        if not np.all(np.isfinite(array)):
            raise ImageLoadError(name, "float data contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < _FLOAT_REFUSE_BELOW or high > _FLOAT_REFUSE_ABOVE:
            raise ImageLoadError(
                name, f"float data must lie in [0, 1], got [{low:g}, {high:g}] "
                      "(divide 0-255 data by 255 or pass uint8)")
        return np.rint(np.clip(array.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    raise ImageLoadError(
        name, f"unsupported dtype {array.dtype} (use bool, uint8, uint16 or float)")


def _reason(exc: BaseException) -> str:
    """Exception text for a message, with the exception type when the text is empty."""
    return str(exc) or type(exc).__name__
