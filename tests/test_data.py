"""Training data pipeline: sources, per-sample transforms, the batch loader."""

from __future__ import annotations

import builtins
import io
import json
import logging
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from moebius_jax.data.loader import Sharding, make_train_iterator, record_stream
from moebius_jax.data.masks import load_mask_config
from moebius_jax.data.sources import (
    DataSourceError,
    Item,
    ListSource,
    folder_source,
    jsonl_source,
    tfds_source,
)
from moebius_jax.data.transforms import (
    background_mask,
    collate,
    dilate,
    image_to_array,
    mask_crop_range,
    prepare_sample,
    random_flip,
    random_mask_crop,
    resize_short_side,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
S = 32  # image_size in these tests: small keeps them fast, the logic is size-independent
BG_IDS = np.arange(10, dtype=np.int32)
FG_IDS = np.arange(10, 20, dtype=np.int32)


@pytest.fixture(scope="module")
def mask_config():
    return load_mask_config("random_medium_256")


def write_image(path: pathlib.Path, pixels: np.ndarray) -> pathlib.Path:
    """Save uint8 pixels (H, W) or (H, W, 3) losslessly (PNG unless the suffix says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def solid(path: pathlib.Path, width: int, height: int, value: int = 128) -> pathlib.Path:
    return write_image(path, np.full((height, width, 3), value, np.uint8))


def write_jsonl(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Sources


def test_jsonl_resolves_relative_paths_and_orders_background_first(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name in ("a", "b", "c", "m"):
        solid(data / "img" / f"{name}.png", 8, 8)
    absolute = solid(tmp_path / "elsewhere" / "d.png", 8, 8)
    jsonl = write_jsonl(
        data / "train.jsonl",
        [
            json.dumps({"image": "img/a.png", "prompt": "foreground", "mask": "img/m.png"}),
            json.dumps({"image": "img/b.png", "prompt": "background"}),
            "",
            # The reference's list convention: the record is element [1].
            json.dumps(
                ["ignored", {"image": "img/c.png", "prompt": "background", "mask": "img/m.png"}]
            ),
            json.dumps(
                {"image": str(absolute), "prompt": "background", "caption": "extra keys ignored"}
            ),
        ],
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # paths are relative to the jsonl, not the cwd
    source = jsonl_source(jsonl)
    assert [(item.image.name, item.prompt) for item in source] == [
        ("b.png", "background"),
        ("c.png", "background"),
        ("d.png", "background"),
        ("a.png", "foreground"),
    ]
    assert source[0].image == data.resolve() / "img" / "b.png"
    assert source[1].mask == data.resolve() / "img" / "m.png" and source[0].mask is None
    assert source[2].image == absolute
    assert source[3].origin == f"{jsonl}:1"
    assert source.foreground_masks == (data.resolve() / "img" / "m.png",)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "a.png", "prompt": "object"}', "prompt"),
        ("{'image': 'a.png', 'prompt': 'background'}", "not valid JSON"),  # Python, not JSON
        ('{"image": "missing.png", "prompt": "background"}', "image file not found"),
        ('{"image": "a.png", "prompt": "background", "mask": "nope.png"}', "mask file not found"),
        ('{"image": "a.png"}', "missing key 'prompt'"),
        ('{"prompt": "background"}', "missing key 'image'"),
        ('{"image": "a.png", "prompt": "foreground"}', "needs a 'mask'"),
        ('{"image": 3, "prompt": "background"}', "path string"),
        ('["only one element"]', "index 1"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    solid(tmp_path / "a.png", 8, 8)
    jsonl = write_jsonl(
        tmp_path / "train.jsonl", ['{"image": "a.png", "prompt": "background"}', line]
    )
    with pytest.raises(DataSourceError, match=message) as info:
        jsonl_source(jsonl)
    assert f"{jsonl}:2" in str(info.value)


def test_jsonl_is_never_evaluated(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    jsonl = write_jsonl(tmp_path / "train.jsonl", [f"__import__('os').system('touch {marker}')"])

    def forbidden(*args, **kwargs):
        raise AssertionError("data was evaluated as code")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    with pytest.raises(DataSourceError, match=rf"{jsonl}:1: not valid JSON"):
        jsonl_source(jsonl)
    assert not marker.exists()


def test_jsonl_skips_non_object_values_with_a_warning(tmp_path, caplog):
    solid(tmp_path / "a.png", 8, 8)
    jsonl = write_jsonl(
        tmp_path / "train.jsonl", ["42", '{"image": "a.png", "prompt": "background"}']
    )
    with caplog.at_level(logging.WARNING):
        source = jsonl_source(jsonl)
    assert len(source) == 1
    assert f"{jsonl}:1" in caplog.text


def test_jsonl_without_items_or_file_is_an_error(tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        jsonl_source(tmp_path / "none.jsonl")
    with pytest.raises(DataSourceError, match="no training items"):
        jsonl_source(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_folder_source_sorted_background_items_with_masks_by_stem(tmp_path):
    for name in ("b.png", "a.jpg", "c.JPEG", "d.webp"):
        solid(tmp_path / "img" / name, 8, 8)
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    (tmp_path / "img" / "sub.png").mkdir()
    solid(tmp_path / "masks" / "a.png", 8, 8)
    source = folder_source(tmp_path / "img", tmp_path / "masks")
    assert [item.image.name for item in source] == ["a.jpg", "b.png", "c.JPEG", "d.webp"]
    assert {item.prompt for item in source} == {"background"}
    assert source[0].mask == tmp_path / "masks" / "a.png"
    assert [item.mask for item in source[1:]] == [None, None, None]
    assert source.foreground_masks == ()

    solid(tmp_path / "masks" / "a.jpg", 8, 8)
    with pytest.raises(DataSourceError, match="two masks for stem 'a'"):
        folder_source(tmp_path / "img", tmp_path / "masks")


def test_tfds_source_explains_the_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'moebius-jax\[data\]'"):
        tfds_source("anything", "train")


def test_tfds_source_reads_a_local_array_record_dataset(tmp_path, mask_config):
    tfds = pytest.importorskip("tensorflow_datasets",
                               reason="the optional data extra (pip install -e '.[data]') is not installed")
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(3)]

    class MoebiusTestPhotos(tfds.core.GeneratorBasedBuilder):
        """Three random RGB pictures, written locally (no download)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "picture": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=2),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, picture in enumerate(pictures):
                yield i, {"picture": picture, "label": i % 2}

    MoebiusTestPhotos(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

    source = tfds_source("moebius_test_photos", "train", tmp_path, image_key="picture")
    assert len(source) == 3
    decoded = []
    for item in source:
        assert item.prompt == "background" and item.mask is None and isinstance(item.image, bytes)
        decoded.append(np.asarray(Image.open(io.BytesIO(item.image))))
    # PNG is lossless: the records hold exactly the pictures (in TFDS' own order).
    assert sorted(p.tobytes() for p in decoded) == sorted(p.tobytes() for p in pictures)
    sample = prepare_sample(
        source, 1, np.random.default_rng(0), image_size=S, mask_config=mask_config
    )
    assert sample["image"].shape == (S, S, 3) and np.array_equal(sample["input_ids"], BG_IDS)
    # The ArrayRecord source travels to a worker process and reads the same there.
    in_worker = iterate(source, mask_config, 1, num_workers=1)
    assert_same_batches(in_worker, iterate(source, mask_config, 1))

    with pytest.raises(DataSourceError, match="'label' is not an Image feature"):
        tfds_source("moebius_test_photos", "train", tmp_path, image_key="label")
    with pytest.raises(DataSourceError, match="moebius_test_photos/test"):
        tfds_source("moebius_test_photos", "test", tmp_path, image_key="picture")


# --------------------------------------------------------------------------------------------
# Transforms


def test_resize_short_side_like_torchvision():
    def size_after(width, height):
        return resize_short_side(
            Image.new("RGB", (width, height)), S, Image.Resampling.LANCZOS
        ).size

    assert size_after(100, 50) == (64, 32)
    assert size_after(50, 77) == (32, 49)  # int(32 * 77 / 50) = int(49.28)
    assert size_after(10, 10) == (32, 32)
    image = Image.new("RGB", (S, 90))
    assert resize_short_side(image, S, Image.Resampling.LANCZOS) is image  # already S: untouched


def test_image_to_array_maps_to_minus_one_one():
    pixels = np.array([[[0, 128, 255]]], np.uint8)
    out = image_to_array(Image.fromarray(pixels))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-1.0, 2 * 128 / 255 - 1, 1.0]]], rtol=0, atol=1e-7)


def brute_force_dilate(mask: np.ndarray, kernel: int, iterations: int) -> np.ndarray:
    """cv2.dilate's definition: max over the k×k window, outside pixels never count."""
    r = kernel // 2
    out = mask
    for _ in range(iterations):
        padded = np.pad(out, r, constant_values=0)  # 0 is uint8's minimum: never the max
        out = np.max(
            [
                padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
                for dy in range(kernel)
                for dx in range(kernel)
            ],
            axis=0,
        )
    return out


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("iterations", [1, 2])
def test_dilate_equals_brute_force(kernel, iterations):
    rng = np.random.default_rng(kernel * 10 + iterations)
    mask = np.where(rng.random((13, 17)) < 0.05, rng.integers(1, 256, (13, 17)), 0).astype(np.uint8)
    mask[0, 0], mask[12, 16], mask[6, 0] = 255, 90, 200  # corners and an edge
    assert np.array_equal(
        dilate(mask, kernel, iterations), brute_force_dilate(mask, kernel, iterations)
    )


@pytest.mark.parametrize(
    "shape, hole_rows, hole_cols, expected",
    [
        ((4, 10), None, None, (1, 0, 6)),  # landscape, no hole: randint(0, w - h)
        ((10, 4), None, None, (0, 0, 6)),  # portrait, no hole: randint(0, h - w)
        ((5, 5), None, None, (0, 0, 1)),  # square: offset 0
        ((5, 5), (1, 3), (1, 3), (0, 0, 1)),
        # hole cols 2..5: centre 3.5; lo = max(0, min(5, -0.5)) = 0, hi = min(6, 3.5) -> 3
        ((4, 10), (0, 4), (2, 6), (1, 0, 3)),
        # hole cols 7..10 of 20: centre 8.5; lo = 4.5 -> 4, hi = 8.5 -> 8
        ((4, 20), (1, 2), (7, 11), (1, 4, 8)),
        # hole in the last column: lo = min(w-h-1, 9-4) = 5, hi = 6; the exclusive bound leaves
        # the crop at columns 5..8, one short of the hole (as in the reference)
        ((4, 10), (0, 1), (9, 10), (1, 5, 6)),
        # hole in the first column: hi = max(lo + 1, min(6, 0)) = 1
        ((4, 10), (2, 3), (0, 1), (1, 0, 1)),
        # portrait, hole rows 6..7: centre 6.5; lo = 2.5 -> 2, hi = min(6, 6.5) = 6
        ((10, 4), (6, 8), (0, 4), (0, 2, 6)),
    ],
)
def test_mask_crop_range_hand_computed(shape, hole_rows, hole_cols, expected):
    hole = np.zeros(shape, bool)
    if hole_rows is not None:
        hole[slice(*hole_rows), slice(*hole_cols)] = True
    assert mask_crop_range(hole) == expected


def test_mask_crop_keeps_the_hole_centre_and_crops_jointly():
    rng = np.random.default_rng(0)
    for trial in range(200):
        short, long = int(rng.integers(4, 12)), int(rng.integers(4, 30))
        h, w = (short, long) if trial % 2 else (long, short)
        mask = np.zeros((h, w, 1), np.float32)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y0 : y0 + int(rng.integers(1, 5)), x0 : x0 + int(rng.integers(1, 5))] = 1.0
        axis, lo, hi = mask_crop_range(mask[..., 0] > 0.5)
        coords = np.nonzero(mask[..., 0])[axis]
        centre = (coords.min() + coords.max()) / 2
        side = min(h, w)
        for offset in range(lo, hi):  # every possible draw
            # The crop reaches the centre, to within the one pixel that the truncated bounds and
            # the exclusive upper bound can cost.
            assert offset <= centre < offset + side + 1
        # Joint crop: pixel values encode (row, col), the mask window must be the same one.
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        image = np.stack([rows, cols, np.zeros((h, w))], -1)
        cropped, cropped_mask = random_mask_crop(image.astype(np.float32), mask, rng)
        assert cropped.shape == (side, side, 3) and cropped_mask.shape == (side, side, 1)
        top, left = int(cropped[0, 0, 0]), int(cropped[0, 0, 1])
        assert (top if axis == 0 else left) in range(lo, hi) and (left if axis == 0 else top) == 0
        assert np.array_equal(cropped_mask, mask[top : top + side, left : left + side])


def test_flip_is_joint_and_happens_half_the_time():
    image = np.arange(12, dtype=np.float32).reshape(1, 4, 3).repeat(2, axis=0)
    mask = np.array([1, 0, 0, 0], np.float32).reshape(1, 4, 1).repeat(2, axis=0)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(400):
        out_image, out_mask = random_flip(image, mask, rng)
        flipped = out_mask[0, -1, 0] == 1
        flips += flipped
        expected = (image[:, ::-1], mask[:, ::-1]) if flipped else (image, mask)
        assert np.array_equal(out_image, expected[0]) and np.array_equal(out_mask, expected[1])
    assert 150 < flips < 250


@pytest.mark.parametrize("width, height", [(40, 70), (90, 50), (64, 64), (S, 45)])
def test_prepare_sample_shapes_dtypes_ranges(tmp_path, mask_config, width, height):
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    source = ListSource(
        [Item(write_image(tmp_path / "x.png", pixels), "background", None, "x")], "t"
    )
    for seed in range(5):
        sample = prepare_sample(
            source, 0, np.random.default_rng(seed), image_size=S, mask_config=mask_config
        )
        assert sample["image"].shape == (S, S, 3) and sample["image"].dtype == np.float32
        assert sample["mask"].shape == (S, S, 1) and sample["mask"].dtype == np.float32
        assert sample["input_ids"].dtype == np.int32 and np.array_equal(sample["input_ids"], BG_IDS)
        assert -1 <= sample["image"].min() and sample["image"].max() <= 1
        assert 0 <= sample["mask"].min() and sample["mask"].max() <= 1


def test_prepare_sample_foreground_mask_follows_the_image_through_flips(tmp_path, mask_config):
    # Left half dark with the hole on it; after dilation (≤ 6 px), crop and flip, the hole and
    # the dark half must still be on the same side.
    pixels = np.full((S, S, 3), 255, np.uint8)
    pixels[:, : S // 2] = 0
    hole = np.zeros((S, S), np.uint8)
    hole[:, : S // 2] = 255
    item = Item(
        write_image(tmp_path / "x.png", pixels),
        "foreground",
        write_image(tmp_path / "m.png", hole),
        "x",
    )
    source = ListSource([item], "t")
    sides = set()
    for seed in range(12):
        sample = prepare_sample(
            source, 0, np.random.default_rng(seed), image_size=S, mask_config=mask_config
        )
        assert np.array_equal(sample["input_ids"], FG_IDS)
        image, mask = sample["image"][..., 0], sample["mask"][..., 0]
        dark_left = image[:, 0].mean() < 0
        assert (mask[:, 0] == 1).all() == dark_left and (mask[:, -1] == 1).all() == (not dark_left)
        assert (mask[image > 0.5] == 0).any()  # the dilation grew the hole, not over everything
        sides.add(dark_left)
    assert sides == {True, False}


def test_background_mask_uses_the_item_mask_and_the_extra_and(tmp_path, mask_config):
    rng = np.random.default_rng(0)
    own = rng.integers(0, 256, (S, S), dtype=np.uint8)
    extra = rng.integers(0, 256, (S, S), dtype=np.uint8)
    item = Item(
        solid(tmp_path / "x.png", S, S), "background", write_image(tmp_path / "own.png", own), "x"
    )
    fg_masks = [write_image(tmp_path / "extra.png", extra)]
    seen = {"own": 0, "own&extra": 0, "other": 0}
    for seed in range(40):
        mask = background_mask(item, fg_masks, np.random.default_rng(seed), S, S, mask_config, True)
        key = (
            "own"
            if np.array_equal(mask, own)
            else "own&extra"
            if np.array_equal(mask, own & extra)
            else "other"
        )
        seen[key] += 1
    assert min(seen.values()) > 0  # LaMa masks ("other"), the item's mask, and the AND all occur
    never_extra = [
        background_mask(item, fg_masks, np.random.default_rng(s), S, S, mask_config, False)
        for s in range(20)
    ]
    assert not any(np.array_equal(m, own & extra) for m in never_extra)


def test_unreadable_image_falls_back_to_the_next_item_once(tmp_path, mask_config, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = Item(
        solid(tmp_path / "g.png", 40, 40),
        "foreground",
        solid(tmp_path / "m.png", 40, 40, 255),
        "line 2",
    )
    source = ListSource([Item(broken, "background", None, "line 1"), good], "t")
    with caplog.at_level(logging.WARNING):
        sample = prepare_sample(
            source, 0, np.random.default_rng(0), image_size=S, mask_config=mask_config
        )
    assert np.array_equal(sample["input_ids"], FG_IDS)  # item 1's sample
    assert "line 1" in caplog.text and str(broken) in caplog.text

    both = ListSource(
        [Item(broken, "background", None, "line 1"), Item(broken, "background", None, "line 2")],
        "t",
    )
    with pytest.raises(DataSourceError, match="line 1.*line 2"):
        prepare_sample(both, 0, np.random.default_rng(0), image_size=S, mask_config=mask_config)


def test_collate_binarises_and_masks():
    image = np.linspace(-1, 1, 2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    soft = np.array([0.0, 0.49, 0.5, 1.0, 0.7, 0.2, 0.51, 0.0], np.float32).reshape(2, 2, 2, 1)
    samples = [{"image": image[i], "mask": soft[i], "input_ids": BG_IDS} for i in range(2)]
    batch = collate(samples)
    expected_mask = (soft >= 0.5).astype(np.float32)
    assert np.array_equal(batch["mask"], expected_mask) and batch["mask"].dtype == np.float32
    assert np.array_equal(batch["masked_image"], image * (1 - expected_mask))
    assert batch["input_ids"].shape == (2, 10) and batch["input_ids"].dtype == np.int32


# --------------------------------------------------------------------------------------------
# Loader


N_RECORDS = 7


@pytest.fixture(scope="module")
def coded_source(tmp_path_factory):
    """Solid images whose grey level names the record: 20·(index + 1)."""
    folder = tmp_path_factory.mktemp("coded")
    for i in range(N_RECORDS):
        solid(folder / f"{i:02d}.png", 40 + 3 * i, 36, 20 * (i + 1))
    return folder_source(folder)


def record_ids(batch: dict[str, np.ndarray]) -> list[int]:
    grey = (batch["image"][:, 0, 0, 0] + 1) * 127.5
    return [int(round(g / 20)) - 1 for g in grey]


def iterate(source, mask_config, steps, **kwargs):
    options = dict(
        batch_size=2,
        image_size=S,
        mask_config=mask_config,
        seed=7,
        num_workers=0,
        process_index=0,
        process_count=1,
    )
    options.update(kwargs)
    with make_train_iterator(source, **options) as it:
        return [next(it) for _ in range(steps)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key], y[key]), key


def test_batch_contract(coded_source, mask_config):
    for batch in iterate(coded_source, mask_config, 3):
        assert batch["image"].shape == (2, S, S, 3) and batch["image"].dtype == np.float32
        assert (
            batch["masked_image"].shape == (2, S, S, 3)
            and batch["masked_image"].dtype == np.float32
        )
        assert batch["mask"].shape == (2, S, S, 1) and batch["mask"].dtype == np.float32
        assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
        assert np.array_equal(batch["masked_image"], batch["image"] * (1 - batch["mask"]))
        assert batch["input_ids"].shape == (2, 10) and batch["input_ids"].dtype == np.int32
        assert type(batch["image"]) is np.ndarray


def test_same_seed_same_batches_other_seed_others(coded_source, mask_config):
    first = iterate(coded_source, mask_config, 4)
    assert_same_batches(first, iterate(coded_source, mask_config, 4))
    other = iterate(coded_source, mask_config, 4, seed=8)
    assert any(not np.array_equal(a["mask"], b["mask"]) for a, b in zip(first, other, strict=True))


def test_processes_read_disjoint_shards_and_each_epoch_is_a_permutation(coded_source, mask_config):
    shards = []
    for process in range(2):
        records = record_stream(Sharding(N_RECORDS, process_index=process, process_count=2), seed=7)
        shard = set(range(process, N_RECORDS, 2))
        stream = [records[i] for i in range(3 * len(shard))]
        epochs = [stream[i : i + len(shard)] for i in range(0, len(stream), len(shard))]
        assert all(sorted(epoch) == sorted(shard) for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled between epochs
        shards.append(shard)
        # The batches really hold those records (the grey level names the record).
        seen = {
            r
            for b in iterate(coded_source, mask_config, 4, process_index=process, process_count=2)
            for r in record_ids(b)
        }
        assert seen == shard
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(N_RECORDS))
    with pytest.raises(DataSourceError, match="cannot be sharded"):
        Sharding(3, process_index=0, process_count=4)


def test_resume_from_state_reproduces_the_next_batches(coded_source, mask_config):
    options = dict(
        batch_size=2,
        image_size=S,
        mask_config=mask_config,
        seed=7,
        num_workers=0,
        process_index=0,
        process_count=1,
    )
    with make_train_iterator(coded_source, **options) as it:
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
        expected = [next(it) for _ in range(3)]
    assert state["step"] == 3
    with make_train_iterator(coded_source, **options) as resumed:
        next(resumed)  # wherever it was, set_state moves it
        resumed.set_state(state)
        assert_same_batches([next(resumed) for _ in range(3)], expected)
    with make_train_iterator(coded_source, start_step=3, **options) as started:
        assert_same_batches([next(started) for _ in range(3)], expected)
    with make_train_iterator(coded_source, **{**options, "seed": 8}) as wrong:
        with pytest.raises(ValueError, match="seed: saved 7, now 8"):
            wrong.set_state(state)


def test_workers_give_the_same_batches_as_in_process(coded_source, mask_config):
    in_process = iterate(coded_source, mask_config, 5)
    assert_same_batches(iterate(coded_source, mask_config, 5, num_workers=2), in_process)


def test_process_defaults_come_from_jax(coded_source, mask_config):
    with make_train_iterator(
        coded_source,
        batch_size=1,
        image_size=S,
        mask_config="random_medium_256",
        seed=0,
        num_workers=0,
    ) as it:
        state = it.get_state()
    assert (state["process_index"], state["process_count"]) == (0, 1)


def test_extra_fg_mask_needs_foreground_masks(coded_source, mask_config):
    with pytest.raises(DataSourceError, match="use_extra_fg_mask"):
        make_train_iterator(
            coded_source,
            batch_size=1,
            image_size=S,
            mask_config=mask_config,
            seed=0,
            num_workers=0,
            process_index=0,
            process_count=1,
            use_extra_fg_mask=True,
        )


# --------------------------------------------------------------------------------------------
# Demo data


def test_demo_data_is_small_real_and_loadable(mask_config):
    demo = REPO / "data" / "demo"
    source = jsonl_source(demo / "train.jsonl")
    assert 6 <= len(source) <= 8 and {item.prompt for item in source} == {"background"}
    assert sum(item.image.stat().st_size for item in source) <= 1_000_000
    for item in source:
        with Image.open(item.image) as image:
            assert image.format == "JPEG" and max(image.size) <= 512
    assert (demo / "README.md").is_file()
    sample = prepare_sample(
        source, 0, np.random.default_rng(0), image_size=64, mask_config=mask_config
    )
    assert sample["image"].shape == (64, 64, 3)
