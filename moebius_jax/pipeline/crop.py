"""Crop-to-mask: where to run the model on a photo larger than its native resolution.

Resizing a whole 3000x2000 photo to the model's 512 px short side fills the hole at a quarter
of its scale and upsamples the result ~4x. Instead we run the model on square context
windows around the mask, each at least the native resolution, so a small hole is filled at
exactly the scale the model was trained at. Pure numpy geometry; the pipeline runs each
window through its ordinary resize path and pastes it back with `paste_window`.

The rules (`native` = the model's resolution in px, `margin` = `crop_margin`):

* A region's window is a square of side ``max(native, ceil(L * (1 + 2 * margin)))`` for the
  long side L of its bounding box, centred on the box and shifted (never shrunk) to lie inside
  the image. The margin is relative to the hole, so after the window is resized to `native`
  the hole keeps the same share of the picture whatever its size in pixels.
* A window whose side reaches the image's short side becomes the whole image: it would be
  resized by the same factor as the whole image, so the crop gains no resolution and the whole
  image adds context for free. Hence images with a short side <= `native` always run whole,
  exactly as the resize strategy runs them.
* Several regions (8-connected components of the mask), taken largest first: each joins the
  cluster whose shared window would be smallest, provided that window's long side is at most
  ``max(merge_factor * native, the long sides of the cluster's and the region's own
  windows)``, else it opens a cluster of its own. So regions share a window when that costs at
  most `merge_factor`x of downscaling or makes no window larger than it already had to be,
  and far-apart regions get a window each. One pass, vectorised over the clusters, so even a
  mask of thousands of specks is planned quickly.

Boxes are PIL crop boxes ``(left, top, right, bottom)`` in pixels, right and bottom exclusive;
image sizes are PIL-style ``(width, height)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]

DEFAULT_MARGIN = 0.5  # context on each side of the hole, as a fraction of its bounding box's long side
MERGE_FACTOR = 2.0  # regions may share a window up to this multiple of the native resolution


@dataclasses.dataclass(frozen=True)
class Window:
    """A context window and the mask pixels it fills: `region` is (bottom - top, right - left)
    bool over the window; the model sees every hole in the window but only `region` is pasted."""

    box: Box
    region: np.ndarray


def mask_regions(hole: np.ndarray) -> tuple[np.ndarray, list[Box]]:
    """(H, W) int labels of the mask's 8-connected regions (0 = outside), and region k's box at k - 1."""
    labels, _ = ndimage.label(hole, structure=np.ones((3, 3), dtype=bool))
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]
    return labels, boxes


def window_side(
    long_side: np.ndarray | int, image_size: tuple[int, int], native: int, margin: float,
) -> np.ndarray:
    """Long side of the context window of boxes whose long side is `long_side` (elementwise):
    the square's side, or the image's long side where the window is the whole image."""
    width, height = image_size
    side = np.maximum(native, np.ceil(np.asarray(long_side) * (1 + 2 * margin)))
    return np.where(side >= min(width, height), max(width, height), side).astype(np.int64)


def context_window(box: Box, image_size: tuple[int, int], native: int, margin: float = DEFAULT_MARGIN) -> Box:
    """The context window of one bounding box: a square around it inside the image, or the
    whole image when the square would reach the image's short side (module rules)."""
    width, height = image_size
    left, top, right, bottom = box
    side = int(window_side(_long_side(np.array(box)), image_size, native, margin))
    if side >= min(width, height):
        return 0, 0, width, height
    # Centred (floor), then shifted inside; the window is at least as large as the box, so
    # both keep the box inside it.
    x = min(max(left + (right - left - side) // 2, 0), width - side)
    y = min(max(top + (bottom - top - side) // 2, 0), height - side)
    return x, y, x + side, y + side


def cluster_regions(
    boxes: list[Box], image_size: tuple[int, int], native: int,
    margin: float = DEFAULT_MARGIN, merge_factor: float = MERGE_FACTOR,
) -> list[tuple[Box, list[int]]]:
    """`boxes` grouped into clusters that share a window (module rules): each cluster's
    bounding box and its sorted indices into `boxes`, in the order the clusters were opened."""
    regions = np.array(boxes, dtype=np.int64).reshape(-1, 4)
    bounds = np.zeros((0, 4), dtype=np.int64)
    members: list[list[int]] = []

    def window_long(b: np.ndarray) -> np.ndarray:
        return window_side(_long_side(b), image_size, native, margin)

    # Largest regions first, so small ones join the windows big ones need anyway.
    for k in np.argsort(-_long_side(regions), kind="stable").tolist():
        box = regions[k]
        union = np.concatenate([np.minimum(bounds[:, :2], box[:2]), np.maximum(bounds[:, 2:], box[2:])], axis=1)
        shared = window_long(union)
        allowed = shared <= np.maximum(merge_factor * native, np.maximum(window_long(bounds), window_long(box)))
        if allowed.any():  # join the cluster whose shared window is smallest
            best = int(np.argmin(np.where(allowed, shared, np.iinfo(np.int64).max)))
            bounds[best] = union[best]
            members[best].append(k)
        else:
            bounds = np.concatenate([bounds, box[None]])
            members.append([k])
    return [(tuple(int(v) for v in b), sorted(m)) for b, m in zip(bounds, members)]


def plan_windows(
    hole: np.ndarray, native: int, margin: float = DEFAULT_MARGIN, merge_factor: float = MERGE_FACTOR,
) -> list[Window]:
    """The windows that cover an (H, W) bool mask (module rules); [] for an empty mask.

    Every True pixel belongs to exactly one window's region.
    """
    if margin < 0:
        raise ValueError(f"crop margin must be >= 0, got {margin}")
    labels, boxes = mask_regions(hole)
    image_size = hole.shape[1], hole.shape[0]
    windows = []
    for box, members in cluster_regions(boxes, image_size, native, margin, merge_factor):
        left, top, right, bottom = context_window(box, image_size, native, margin)
        region = np.isin(labels[top:bottom, left:right], np.asarray(members) + 1)
        windows.append(Window((left, top, right, bottom), region))
    return windows


def paste_window(canvas: np.ndarray, piece: np.ndarray, box: Box) -> np.ndarray:
    """A copy of `canvas` with `box` replaced by `piece`; every pixel outside `box` is kept."""
    left, top, right, bottom = box
    out = np.array(canvas)
    out[top:bottom, left:right] = piece
    return out


def _long_side(boxes: np.ndarray) -> np.ndarray:
    """Long side of each (..., 4) box."""
    return np.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
