"""Training-data sources: the reference's jsonl, a plain image folder, and TFDS.

A source is a random-access sequence of :class:`Item` (``len(source)``, ``source[i]``) plus
``foreground_masks``, the masks the ``use_extra_fg_mask`` option draws from. Items only
describe a sample (where its image and mask are, which prompt); opening and preprocessing them
is :mod:`moebius_jax.data.transforms`' job, so sources stay cheap to build and to pickle into
loader workers.

Differences from the reference, all deliberate:

* The jsonl is parsed with :func:`json.loads` only. The reference ``eval``'s a line that is not
  JSON, which runs whatever the data file says; here such a line is an error naming the file
  and line. As in the reference, a line holding a JSON list uses its element ``[1]``, and a
  value that is not an object is skipped (with a warning naming the line, where the reference
  is silent).
* Relative paths are resolved against the jsonl file's folder (not the working directory), so
  a data set can be moved as a whole.
* By default every referenced file must exist when the source is built, and a foreground item
  must have a mask; :func:`check_images` then reads every file's header. Bad data fails at
  start-up with the file and line, not hours into a run.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import pathlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moebius_jax.errors import MissingExtraError, UserError
from moebius_jax.latents import TASKS

logger = logging.getLogger(__name__)

Prompt = Literal["background", "foreground"]
PROMPTS: tuple[str, ...] = TASKS  # a record's prompt is the task it trains
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp"})

# An encoded image (JPEG, PNG, ...): a file, or its bytes (TFDS records).
ImageRef = pathlib.Path | bytes


class DataSourceError(UserError):
    """A data description (jsonl line, folder, TFDS dataset) cannot be used; names where."""


@dataclass(frozen=True, eq=False)
class Item:
    """One training record: its image, prompt, optional mask, and where it was declared."""

    image: ImageRef
    prompt: Prompt
    mask: ImageRef | None
    origin: str  # e.g. "data/train.jsonl:12", for messages

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise DataSourceError(
                f"{self.origin}: prompt must be one of {PROMPTS}, got {self.prompt!r}"
            )


class ListSource(Sequence[Item]):
    """An in-memory list of items (what the jsonl and folder readers build)."""

    def __init__(self, items: Sequence[Item], name: str) -> None:
        if not items:
            raise DataSourceError(f"{name}: no training items")
        self.items: tuple[Item, ...] = tuple(items)
        self.name = name
        # The reference draws extra masks from the foreground items' own masks.
        self.foreground_masks: tuple[ImageRef, ...] = tuple(
            item.mask
            for item in self.items
            if item.prompt == "foreground" and item.mask is not None
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:  # type: ignore[override]
        return self.items[index]

    def __repr__(self) -> str:
        return f"ListSource({self.name!r}, {len(self)} items)"


# --------------------------------------------------------------------------------------------
# jsonl (the reference's format)


def _resolve_path(
    value: Any, key: str, base: pathlib.Path, origin: str, check: bool
) -> pathlib.Path:
    if not isinstance(value, str) or not value:
        raise DataSourceError(f"{origin}: {key!r} must be a non-empty path string, got {value!r}")
    path = pathlib.Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if check and not path.is_file():
        raise DataSourceError(f"{origin}: {key} file not found: {path}")
    return path


def parse_jsonl_line(
    line: str, base: pathlib.Path, origin: str, check_files: bool = True
) -> Item | None:
    """One jsonl line as an :class:`Item`; ``None`` for a blank line or a non-object value."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        # Never evaluated (the reference eval()s such lines): data is not code.
        raise DataSourceError(
            f"{origin}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    if isinstance(record, list):
        # The reference's convention for list lines: the record is element [1].
        if len(record) < 2:
            raise DataSourceError(
                f"{origin}: a JSON list line needs its record at index 1, got {record!r}"
            )
        record = record[1]
    if not isinstance(record, dict):
        logger.warning(
            "%s: skipped, a JSON %s is not a record object", origin, type(record).__name__
        )
        return None
    for key in ("image", "prompt"):
        if key not in record:
            raise DataSourceError(f"{origin}: missing key {key!r}")
    prompt = record["prompt"]
    if prompt not in PROMPTS:
        raise DataSourceError(f"{origin}: 'prompt' must be one of {PROMPTS}, got {prompt!r}")
    image = _resolve_path(record["image"], "image", base, origin, check_files)
    mask = None
    if record.get("mask") is not None:
        mask = _resolve_path(record["mask"], "mask", base, origin, check_files)
    if prompt == "foreground" and mask is None:
        # A foreground item's mask is its only mask source (§3.3); the reference would fail later.
        raise DataSourceError(f"{origin}: a foreground item needs a 'mask'")
    return Item(image=image, prompt=prompt, mask=mask, origin=origin)


def jsonl_source(path: str | pathlib.Path, *, check_files: bool = True) -> ListSource:
    """Read the reference's jsonl: background items in file order, then foreground items.

    ``check_files=False`` skips the existence checks (e.g. for millions of files on a slow
    network file system); a missing image is then handled by the loader's one retry.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataSourceError(f"jsonl file not found: {path}")
    base = path.resolve().parent
    items = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            item = parse_jsonl_line(line, base, f"{path}:{number}", check_files)
            if item is not None:
                items.append(item)
    # The reference lists background items before foreground ones; batches depend on that order.
    ordered = [i for i in items if i.prompt == "background"] + [
        i for i in items if i.prompt == "foreground"
    ]
    return ListSource(ordered, str(path))


# --------------------------------------------------------------------------------------------
# Image folder


def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def folder_source(
    folder: str | pathlib.Path, mask_folder: str | pathlib.Path | None = None
) -> ListSource:
    """Every .jpg/.jpeg/.png/.webp in ``folder`` (sorted by name) as a background item.

    With ``mask_folder``, an image's mask is the file there with the same stem (any of the
    same extensions), used as the background item's optional mask (§3.3); images without one
    get random masks only.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataSourceError(f"image folder not found: {folder}")
    masks: dict[str, pathlib.Path] = {}
    if mask_folder is not None:
        mask_folder = pathlib.Path(mask_folder)
        if not mask_folder.is_dir():
            raise DataSourceError(f"mask folder not found: {mask_folder}")
        for mask in _images_in(mask_folder):
            if mask.stem in masks:
                raise DataSourceError(
                    f"{mask_folder}: two masks for stem {mask.stem!r}: "
                    f"{masks[mask.stem].name}, {mask.name}"
                )
            masks[mask.stem] = mask
    items = [
        Item(image=image, prompt="background", mask=masks.get(image.stem), origin=str(image))
        for image in _images_in(folder)
    ]
    return ListSource(items, str(folder))


# --------------------------------------------------------------------------------------------
# Start-up check

# Above this many files the header check shows a progress bar.
_PROGRESS_FROM = 1000
# Shown when the check fails; the rest are counted.
_LISTED_FAILURES = 10


def _header_problem(path: pathlib.Path) -> str | None:
    """Why Pillow cannot identify ``path`` as an image from its header, or None if it can."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        return "no such file"
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as err:
        return str(err) or type(err).__name__
    return None if width > 0 and height > 0 else f"size {width}x{height}"


def check_images(source: Sequence[Item], workers: int = 16) -> None:
    """Read the header of every image and mask file ``source`` names (Pillow identifies the format
    and size without decoding), in threads, with a progress bar for big sets; every file that is
    missing or not an image is reported at once, naming its item. Encoded records (TFDS) are
    checked when read, by the loader's retry: checking them here would read the whole data set."""
    files: dict[pathlib.Path, str] = {}  # each file once, with the first item naming it
    for item in source:
        for ref in (item.image, item.mask):
            if isinstance(ref, pathlib.Path):
                files.setdefault(ref, item.origin)
    if not files:
        return
    from tqdm import tqdm

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # file-system latency, not CPU
        problems = list(tqdm(pool.map(_header_problem, files), total=len(files), desc="checking images",
                             unit="file", disable=len(files) < _PROGRESS_FROM))
    bad = [f"{origin}: {path}: {problem}" if origin != str(path) else f"{path}: {problem}"
           for (path, origin), problem in zip(files.items(), problems) if problem]
    if bad:
        more = f"\n  ... and {len(bad) - _LISTED_FAILURES} more" if len(bad) > _LISTED_FAILURES else ""
        raise DataSourceError(f"{len(bad)} of {len(files)} data files cannot be read as images:\n  "
                              + "\n  ".join(bad[:_LISTED_FAILURES]) + more)


# --------------------------------------------------------------------------------------------
# TFDS


class TfdsSource(Sequence[Item]):
    """A prepared TFDS split read by record index (ArrayRecord), every record a background item.

    Records come with the image still encoded (TFDS' ``SkipDecoding``), so decoding happens in
    the transforms like for files, with the same one-retry handling of a corrupt image.
    """

    foreground_masks: tuple[ImageRef, ...] = ()

    def __init__(self, records: Sequence[Any], name: str, image_key: str) -> None:
        if len(records) == 0:
            raise DataSourceError(f"TFDS {name}: no records")
        self.records = records
        self.name = name
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Item:  # type: ignore[override]
        index = range(len(self))[index]  # IndexError out of range, as a Sequence must
        encoded = self.records[index][self.image_key]
        return Item(
            image=bytes(encoded),
            prompt="background",
            mask=None,
            origin=f"TFDS {self.name}[{index}]",
        )

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} records)"


def tfds_source(
    name: str, split: str, data_dir: str | pathlib.Path | None = None, image_key: str = "image"
) -> TfdsSource:
    """A prepared TFDS dataset split as background items (needs ``moebius-jax[data]``).

    The split must already be prepared in a random-access format (``array_record``): the
    loader reads records by index, and nothing is downloaded at training time.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise MissingExtraError(
            "tfds_source needs tensorflow-datasets: pip install 'moebius-jax[data]'"
        ) from err
    where = f"{name}/{split}" + (f" in {data_dir}" if data_dir is not None else "")
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    except Exception as err:  # tfds raises many types for unknown / unreadable datasets
        raise DataSourceError(f"TFDS {where}: cannot open the dataset: {err}") from None
    if not builder.is_prepared():
        raise DataSourceError(
            f"TFDS {where}: not prepared; prepare it first, e.g. tfds.builder({name!r}, "
            "data_dir=..., file_format='array_record').download_and_prepare()"
        )
    features = builder.info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        raise DataSourceError(
            f"TFDS {where}: {image_key!r} is not an Image feature; "
            f"features: {list(features.keys())}"
        )
    try:
        records = builder.as_data_source(
            split=split, decoders={image_key: tfds.decode.SkipDecoding()}
        )
    except NotImplementedError:
        raise DataSourceError(
            f"TFDS {where}: stored as {builder.info.file_format}, which has no random access; "
            "prepare it with file_format='array_record' (or convert it with `tfds convert_format`)"
        ) from None
    except (KeyError, ValueError) as err:
        raise DataSourceError(f"TFDS {where}: {err}") from None
    return TfdsSource(records, f"{name}/{split}", image_key)
