"""Build a benchmark folder (ground truth + hole masks + manifest, see `moebius_jax.eval.benchmark`).

Our masks:    python -m moebius_jax.eval.make_benchmark --images DIR --resolution 512 \\
                  --mask-setting random_thick_512 --seed 0 --out BENCH [--name "Places2 thick"]
Given masks:  ... --mask-dir MASKS [--pair-by order|stem] [--mask-hole white|black]
From TFDS:    ... --tfds places365_small --split validation [--data-dir D] [--manual-dir M]

Sources are taken in a fixed order (image files sorted by name, TFDS records by index) and
--limit keeps the first N. Images are centre-cropped to a square and resized to the
resolution (`benchmark.crop_and_resize`). Mask i (0-based, in that order) is our LaMa-style
generator's draw from `mask_rng(seed, 0, 0, i)` at resolution x resolution, so the same
listing, setting and seed give a byte-identical folder. A given mask set is paired either
like MAT's scripts (i-th sorted mask with the i-th sorted image; the counts must agree) or
by file stem, then cropped and resized like the images (nearest neighbour) and binarised
at 128; --mask-hole black reads masks whose holes are black (MAT's: 0 = hole).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import io
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from moebius_jax import cli
from moebius_jax.data.masks import MaskGeneratorConfig, generate_mask, load_mask_config, mask_rng
from moebius_jax.data.sources import Item, folder_source, tfds_source
from moebius_jax.errors import MissingExtraError
from moebius_jax.eval.benchmark import (
    IMAGES, MANIFEST, MASKS, BenchmarkError, Manifest, Pair, crop_and_resize, image_path, mask_path, write_manifest)
from moebius_jax.pipeline.image_io import load_image, load_mask
from moebius_jax.pipeline.preprocess import binarize_mask

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Listing:
    """A source in benchmark order: ``stems[i]`` names ``items[i]``, for i < len(stems).
    Items are fetched only when built (a TFDS record is read by indexing)."""

    description: str
    stems: tuple[str, ...]
    items: Sequence[Item]

    def head(self, limit: int | None) -> Listing:
        """The first ``limit`` entries (all when None); the items are kept, not sliced."""
        return self if limit is None else dataclasses.replace(self, stems=self.stems[:limit])


def folder_listing(folder: str | os.PathLike) -> Listing:
    """The .jpg/.jpeg/.png/.webp files of ``folder`` sorted by name, named by file stem."""
    items = folder_source(folder).items
    stems = tuple(pathlib.Path(item.image).stem for item in items)
    seen: dict[str, Item] = {}
    for stem, item in zip(stems, items):
        if stem in seen:  # a.jpg and a.png would both become images/a.png
            raise BenchmarkError(f"{folder}: two images with the stem {stem!r}: {seen[stem].origin}, {item.origin}")
        seen[stem] = item
    return Listing(f"images: {folder}", stems, items)


def tfds_listing(name: str, split: str, data_dir: str | None, manual_dir: str | None, image_key: str) -> Listing:
    """A TFDS split in record order, named by zero-padded record index. The dataset is
    prepared (downloaded, or read from ``manual_dir`` for Places365 / CelebA-HQ style manual
    downloads) on first use, in the array_record format the random-access reader needs."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise MissingExtraError("--tfds needs tensorflow-datasets: pip install 'moebius-jax[data]'") from err
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        log.info("preparing TFDS %s (once; this can take long)", name)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
                                     file_format="array_record")
    source = tfds_source(name, split, data_dir, image_key)
    width = len(str(len(source) - 1))
    return Listing(f"tfds: {name}/{split}", tuple(f"{i:0{width}d}" for i in range(len(source))), source)


def open_item(item: Item) -> Image.Image:
    """The item's image as upright 8-bit RGB (the pipeline's loader); errors name the source."""
    try:
        return load_image(Image.open(io.BytesIO(item.image)) if isinstance(item.image, bytes) else item.image)
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{item.origin}: {err}") from None


def generated_mask(config: MaskGeneratorConfig, seed: int, resolution: int, index: int) -> np.ndarray:
    """Mask ``index`` of a generated benchmark: one independent stream per position."""
    return generate_mask(config, mask_rng(seed, 0, 0, index), resolution, resolution)


def user_mask(paths: Sequence[pathlib.Path], resolution: int, black_holes: bool, index: int) -> np.ndarray:
    """Mask file ``paths[index]`` cropped, resized (nearest) and binarised to 255 = hole."""
    mask = binarize_mask(load_mask(paths[index]))  # an unreadable file raises ImageLoadError, naming it
    hole = np.asarray(crop_and_resize(mask, resolution, Image.Resampling.NEAREST))
    return 255 - hole if black_holes else hole


def pair_masks(listing: Listing, mask_dir: str | os.PathLike, pair_by: str) -> list[pathlib.Path]:
    """The mask file of each listed image, by sorted order (MAT) or by file stem."""
    masks = [pathlib.Path(item.image) for item in folder_source(mask_dir).items]
    if pair_by == "order":
        if len(masks) != len(listing.stems):
            raise BenchmarkError(f"{mask_dir} has {len(masks)} masks for {len(listing.stems)} images; "
                                 "pairing by order needs as many of each")
        return masks
    by_stem = {m.stem: m for m in masks}
    missing = [s for s in listing.stems if s not in by_stem]
    if missing:
        raise BenchmarkError(f"{mask_dir}: no mask for {len(missing)} image stem(s): {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
    return [by_stem[s] for s in listing.stems]


def build(out: pathlib.Path, name: str, resolution: int, listing: Listing, masks: dict,
          mask_for: Callable[[int], np.ndarray], mask_sources: Sequence[pathlib.Path] | None, workers: int) -> Manifest:
    """Write every image and mask (in parallel; each file depends on its index only), then
    the manifest."""
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / MASKS).mkdir(exist_ok=True)

    def one(index: int) -> tuple[Pair, float]:
        stem, item = listing.stems[index], listing.items[index]
        image = crop_and_resize(open_item(item), resolution, Image.Resampling.BICUBIC)
        image.save(image_path(out, stem), format="PNG")
        mask = mask_for(index)
        Image.fromarray(mask, "L").save(mask_path(out, stem), format="PNG")
        pair = Pair(stem, item.origin, None if mask_sources is None else str(mask_sources[index]))
        return pair, float(np.mean(mask == 255))

    count = len(listing.stems)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL
        done = list(tqdm(pool.map(one, range(count)), total=count, desc="building", unit="pair"))
    pairs, ratios = zip(*done)
    manifest = Manifest(name, resolution, listing.description, masks, pairs, float(np.mean(ratios)))
    write_manifest(out, manifest)
    return manifest


def check_out_dir(out: pathlib.Path) -> None:
    """Refuse a finished benchmark or a folder holding anything but an unfinished build."""
    if (out / MANIFEST).exists():
        raise BenchmarkError(f"{out} already holds a benchmark ({MANIFEST}); choose another --out")
    if out.exists():
        other = sorted(p.name for p in out.iterdir() if p.name not in (IMAGES, MASKS))
        if other:
            raise BenchmarkError(f"{out} is not empty ({', '.join(other[:5])}); choose another --out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="new benchmark folder")
    p.add_argument("--resolution", type=cli.model_resolution, default=512, help="side of the square benchmark images")
    p.add_argument("--name", default=None, help="benchmark name for tables (default: the --out folder name)")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="keep the first N images of the sorted source")
    p.add_argument("--workers", type=cli.positive_int, default=min(8, os.cpu_count() or 1))
    src = p.add_argument_group("source (one)")
    src.add_argument("--images", help="folder of images (.jpg/.jpeg/.png/.webp)")
    src.add_argument("--tfds", help="TFDS dataset name, e.g. places365_small, celeb_a_hq/512")
    src.add_argument("--split", default="validation", help="TFDS split")
    src.add_argument("--data-dir", default=None, help="TFDS data dir")
    src.add_argument("--manual-dir", default=None, help="TFDS manual download dir (CelebA-HQ, Places365 archives)")
    src.add_argument("--image-key", default="image", help="TFDS image feature")
    masks = p.add_argument_group("masks (one)")
    masks.add_argument("--mask-setting", help="our generator: shipped name (random_thick_512, ...) or mask YAML")
    masks.add_argument("--seed", type=int, default=0, help="seed of the generated masks")
    masks.add_argument("--mask-dir", help="folder of given masks (e.g. MAT's)")
    masks.add_argument("--pair-by", choices=("order", "stem"), default="order",
                       help="order: i-th sorted mask with i-th sorted image (MAT); stem: same file stem")
    masks.add_argument("--mask-hole", choices=("white", "black"), default="white",
                       help="colour of the holes in --mask-dir files (MAT's masks: black)")
    args = p.parse_args(argv)
    if (args.images is None) == (args.tfds is None):
        p.error("give exactly one of --images and --tfds")
    if (args.mask_setting is None) == (args.mask_dir is None):
        p.error("give exactly one of --mask-setting and --mask-dir")
    return args


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    out = pathlib.Path(args.out)
    check_out_dir(out)
    if args.images is not None:
        full = folder_listing(args.images)
    else:
        full = tfds_listing(args.tfds, args.split, args.data_dir, args.manual_dir, args.image_key)
    listing = full.head(args.limit)
    if args.mask_setting is not None:
        config = load_mask_config(args.mask_setting)
        masks = {"kind": "generated", "setting": args.mask_setting, "seed": args.seed,
                 "config": dataclasses.asdict(config)}
        mask_for = functools.partial(generated_mask, config, args.seed, args.resolution)
        mask_sources = None
    else:
        # Pair against the full listing (MAT's count check), then keep the same head.
        mask_sources = pair_masks(full, args.mask_dir, args.pair_by)[:len(listing.stems)]
        masks = {"kind": "user", "dir": str(args.mask_dir), "pair_by": args.pair_by, "hole": args.mask_hole}
        mask_for = functools.partial(user_mask, mask_sources, args.resolution, args.mask_hole == "black")
    manifest = build(out, args.name or out.resolve().name, args.resolution, listing, masks, mask_for,
                     mask_sources, args.workers)
    log.info("wrote %s: %d pairs at %dx%d, masks %s", out, len(manifest.pairs), args.resolution,
             args.resolution, manifest.mask_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
