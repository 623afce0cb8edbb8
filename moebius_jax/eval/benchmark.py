"""The benchmark folder: ground-truth images, hole masks and a manifest that describes them.

Layout (written by ``python -m moebius_jax.eval.make_benchmark``)::

    BENCH/manifest.json      name, resolution, source, mask description, pairs in order
    BENCH/images/<stem>.png  ground truth, RGB, resolution x resolution
    BENCH/masks/<stem>.png   8-bit L, 255 = hole, 0 = keep, same size

Every image is brought to the benchmark size by one rule, :func:`crop_and_resize`: the
central square (side = the short side) is cut out, then resized to ``resolution`` with
bicubic interpolation (antialiased when shrinking, as Pillow does; MI-GAN's evaluation
resizes images bicubically too) and masks with nearest neighbour. A source that is already
``resolution`` on its short side is only cropped, so its pixels are kept. The manifest is
written last: a folder without one is an unfinished build and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from PIL import Image

from moebius_jax.errors import UserError
from moebius_jax.io_safety import atomic_output

MANIFEST = "manifest.json"
IMAGES = "images"
MASKS = "masks"
FORMAT = "moebius-jax-benchmark"
VERSION = 1


class BenchmarkError(UserError):
    """A benchmark folder or its manifest is missing, malformed or incomplete; names the file."""


def image_path(root: pathlib.Path, stem: str) -> pathlib.Path:
    return root / IMAGES / f"{stem}.png"


def mask_path(root: pathlib.Path, stem: str) -> pathlib.Path:
    return root / MASKS / f"{stem}.png"


@dataclasses.dataclass(frozen=True)
class Pair:
    """One ground-truth image and its mask, stored as images/<stem>.png and masks/<stem>.png.

    ``source`` says where the image came from (a path or a TFDS record), ``mask_source`` the
    user mask file it was paired with (None for a generated mask).
    """

    stem: str
    source: str
    mask_source: str | None = None

    def image_path(self, root: pathlib.Path) -> pathlib.Path:
        return image_path(root, self.stem)

    def mask_path(self, root: pathlib.Path) -> pathlib.Path:
        return mask_path(root, self.stem)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a benchmark is: everything needed to rebuild it and to caption its results.

    ``masks`` is ``{"kind": "generated", "setting", "seed", "config"}`` (our LaMa-style
    generator; ``config`` is the parsed setting, so the folder documents itself) or
    ``{"kind": "user", "dir", "pair_by", "hole"}`` (a given mask set).
    """

    name: str
    resolution: int
    source: str
    masks: dict[str, Any]
    pairs: tuple[Pair, ...]
    mean_hole_ratio: float

    def mask_summary(self) -> str:
        """One line for captions, e.g. "random_thick_512, seed 0, 27.1 % hole on average"."""
        m = self.masks
        what = (f"{m['setting']}, seed {m['seed']}" if m["kind"] == "generated"
                else f"user masks from {m['dir']} (paired by {m['pair_by']})")
        return f"{what}, {100 * self.mean_hole_ratio:.1f} % hole on average"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "resolution": self.resolution,
            "source": self.source, "masks": self.masks, "count": len(self.pairs),
            "mean_hole_ratio": self.mean_hole_ratio,
            "pairs": [dataclasses.asdict(p) for p in self.pairs],
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Parse a manifest mapping; ``where`` (the file) is named in every error."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BenchmarkError(f"{where}: not a {FORMAT} manifest")
        if data.get("version") != VERSION:
            raise BenchmarkError(f"{where}: manifest version {data.get('version')!r}; this code reads {VERSION}")
        try:
            pairs = tuple(Pair(**p) for p in data["pairs"])
            manifest = cls(name=str(data["name"]), resolution=int(data["resolution"]), source=str(data["source"]),
                           masks=dict(data["masks"]), pairs=pairs, mean_hole_ratio=float(data["mean_hole_ratio"]))
        except (KeyError, TypeError, ValueError) as err:
            raise BenchmarkError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None
        if data.get("count") != len(pairs):
            raise BenchmarkError(f"{where}: count {data.get('count')} but {len(pairs)} pairs listed")
        if not pairs:
            raise BenchmarkError(f"{where}: no pairs")
        return manifest


def write_manifest(root: pathlib.Path, manifest: Manifest) -> None:
    """Write BENCH/manifest.json atomically (its presence marks a finished build)."""
    with atomic_output(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")


def read_manifest(root: str | pathlib.Path) -> Manifest:
    """Read and check a benchmark folder: the manifest parses and every listed file exists."""
    root = pathlib.Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BenchmarkError(f"{path} not found: {root} is not a (finished) benchmark folder; "
                             "build one with `python -m moebius_jax.eval.make_benchmark`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{path}: cannot read the manifest ({err})") from None
    manifest = Manifest.from_json(data, str(path))
    missing = [str(f) for p in manifest.pairs for f in (p.image_path(root), p.mask_path(root)) if not f.is_file()]
    if missing:
        raise BenchmarkError(f"{path}: {len(missing)} listed file(s) missing: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
    return manifest


def crop_and_resize(image: Image.Image, resolution: int, resample: Image.Resampling) -> Image.Image:
    """The central square of ``image`` (side = its short side), resized to ``resolution``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square if side == resolution else square.resize((resolution, resolution), resample)

