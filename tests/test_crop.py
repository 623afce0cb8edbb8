"""Crop-to-mask: window geometry by hand, and the crop / resize strategies end to end with the
tiny student and tiny VAE (native resolution 128 px, the tiny config's image size)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_infer import FAST, VAE, WEIGHTS, _mask, _photo

import infer
from moebius_jax.pipeline import crop

NATIVE = 128
PHOTO = (3000, 2000)


def _hole(size: tuple[int, int], *boxes: crop.Box) -> np.ndarray:
    hole = np.zeros(size[::-1], dtype=bool)
    for left, top, right, bottom in boxes:
        hole[top:bottom, left:right] = True
    return hole


# ---- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize("margin, expected", [
    # box 200x100: side = 200 * (1 + 2 * margin), centred: left + (200 - side) // 2, top + (100 - side) // 2
    (0.5, (900, 350, 1300, 750)),  # side 400
    (1.0, (800, 250, 1400, 850)),  # side 600
    (0.0, (1000, 450, 1200, 650)),  # side 200: the box's own long side, still square
])
def test_margin_grows_a_square_around_the_box(margin, expected):
    assert crop.context_window((1000, 500, 1200, 600), PHOTO, NATIVE, margin) == expected


def test_window_is_at_least_the_native_resolution():
    # box 10x5 -> 2 * 10 = 20 < 128: side 128, left 1500 + (10 - 128) // 2, top 1000 + (5 - 128) // 2
    assert crop.context_window((1500, 1000, 1510, 1005), PHOTO, NATIVE) == (1441, 938, 1569, 1066)


@pytest.mark.parametrize("box, expected", [
    ((0, 0, 20, 20), (0, 0, 128, 128)),  # would start at -54: shifted right and down
    ((2990, 1990, 3000, 2000), (2872, 1872, 3000, 2000)),  # shifted left and up
    ((5, 1000, 25, 1020), (0, 946, 128, 1074)),  # only x clamps
])
def test_window_is_shifted_inside_the_image_not_shrunk(box, expected):
    assert crop.context_window(box, PHOTO, NATIVE) == expected


def test_window_reaching_the_short_side_is_the_whole_image():
    # long side 1000 -> side 2000 = the short side: the whole image; 999 -> 1998 still fits,
    # left 1000 + (999 - 1998) // 2 = 500, top clamped to 0.
    assert crop.context_window((1000, 0, 2000, 10), PHOTO, NATIVE) == (0, 0, 3000, 2000)
    assert crop.context_window((1000, 0, 1999, 10), PHOTO, NATIVE) == (500, 0, 2498, 1998)
    # An image whose short side is at most the native resolution always runs whole.
    assert crop.context_window((60, 30, 90, 60), (150, 100), NATIVE) == (0, 0, 150, 100)
    assert crop.context_window((10, 10, 20, 20), (128, 128), NATIVE) == (0, 0, 128, 128)


def test_regions_are_8_connected():
    hole = np.zeros((6, 6), dtype=bool)
    hole[0, 0] = hole[1, 1] = True  # diagonal neighbours: one region
    hole[4:6, 3:6] = True
    labels, boxes = crop.mask_regions(hole)
    assert boxes == [(0, 0, 2, 2), (3, 4, 6, 6)]
    assert labels[1, 1] == 1 and labels[5, 5] == 2 and labels[0, 1] == 0


@pytest.mark.parametrize("second, merged", [
    # Two 20x20 regions at x = 100 and x = second: union long side L = second + 20 - 100,
    # shared side 2L <= 2 * 128 (merge_factor x native) iff L <= 128.
    (200, True),  # L 120
    (208, True),  # L 128: side 256, exactly the limit
    (209, False),  # L 129: side 258
])
def test_nearby_regions_share_a_window_far_ones_do_not(second, merged):
    hole = _hole(PHOTO, (100, 100, 120, 120), (second, 100, second + 20, 120))
    windows = crop.plan_windows(hole, NATIVE)
    assert len(windows) == (1 if merged else 2)


def test_multi_region_windows_and_their_regions():
    a, b, c = (100, 100, 120, 120), (200, 100, 220, 120), (2000, 1500, 2010, 1520)
    hole = _hole(PHOTO, a, b, c)
    first, second = crop.plan_windows(hole, NATIVE)
    # a + b: union (100, 100, 220, 120), side 240, left 100 - 60, top 100 - 110 -> clamped to 0.
    assert first.box == (40, 0, 280, 240)
    # c alone: 10x20 -> side 128, left 2000 + (10 - 128) // 2 = 1941, top 1500 - 54.
    assert second.box == (1941, 1446, 2069, 1574)
    for window in (first, second):  # each region is exactly the hole pixels it owns
        left, top, right, bottom = window.box
        assert window.region.shape == (bottom - top, right - left)
    assert first.region.sum() == 800 and second.region.sum() == 200
    np.testing.assert_array_equal(first.region, hole[0:240, 40:280])


def test_a_region_inside_a_whole_image_window_joins_it():
    big, small = (1000, 500, 2000, 600), (2900, 1900, 2910, 1910)  # big: side 2000 -> whole image
    windows = crop.plan_windows(_hole(PHOTO, big, small), NATIVE)
    assert [w.box for w in windows] == [(0, 0, 3000, 2000)]
    assert windows[0].region.sum() == 1000 * 100 + 100


def test_every_hole_pixel_belongs_to_exactly_one_window():
    rng = np.random.default_rng(0)
    hole = _hole(PHOTO, (1200, 800, 1500, 1000))
    hole[rng.integers(0, 2000, 500), rng.integers(0, 3000, 500)] = True  # 500 specks
    count = np.zeros(hole.shape, dtype=np.int64)
    for window in crop.plan_windows(hole, NATIVE):
        left, top, right, bottom = window.box
        assert right - left == bottom - top or window.box == (0, 0, *PHOTO)  # square unless whole
        count[top:bottom, left:right] += window.region
    np.testing.assert_array_equal(count, hole)


def test_empty_mask_and_bad_margin():
    assert crop.plan_windows(np.zeros((50, 80), dtype=bool), NATIVE) == []
    with pytest.raises(ValueError, match="margin"):
        crop.plan_windows(np.ones((50, 80), dtype=bool), NATIVE, margin=-0.1)


def test_paste_window_changes_only_the_box():
    canvas = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    before = canvas.copy()
    out = crop.paste_window(canvas, np.zeros((2, 3, 3), np.uint8), (1, 2, 4, 4))
    np.testing.assert_array_equal(canvas, before)  # the input is not modified
    inside = np.zeros((5, 6), dtype=bool)
    inside[2:4, 1:4] = True
    assert not out[inside].any()
    np.testing.assert_array_equal(out[~inside], before[~inside])


# ---- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture
def shared_infer(pipe, monkeypatch):
    """infer.main with this module's pipeline, so each window shape compiles once here
    (infer's own loading is covered by test_infer)."""
    monkeypatch.setattr(infer, "load_pipeline", lambda args: pipe)
    return lambda *argv: infer.main(["--weights", str(WEIGHTS), "--vae", str(VAE), *argv, "--steps", "2"])


def test_infer_crop_on_a_large_photo_changes_only_the_windows(pipe, shared_infer, tmp_path):
    holes = [(500, 400, 540, 430), (2200, 1500, 2220, 1520)]
    image = _photo(*PHOTO, 20)
    mask = Image.fromarray(_hole(PHOTO, *holes).astype(np.uint8) * np.uint8(255))
    image.save(tmp_path / "photo.png"), mask.save(tmp_path / "mask.png")
    code = shared_infer("--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                        "--out", str(tmp_path / "out.png"), "--strategy", "crop", "--batch-size", "1")
    assert code == 0
    out, original = np.asarray(Image.open(tmp_path / "out.png")), np.asarray(image)
    assert out.shape == original.shape
    # Windows by hand: 40x30 and 20x20 boxes -> 128 px squares centred on them, far apart.
    windows = [(456, 351, 584, 479), (2146, 1446, 2274, 1574)]
    inside = np.zeros(original.shape[:2], dtype=bool)
    for left, top, right, bottom in windows:
        inside[top:bottom, left:right] = True
    np.testing.assert_array_equal(out[~inside], original[~inside])
    for left, top, right, bottom in holes:
        assert np.any(out[top:bottom, left:right] != original[top:bottom, left:right])
    # Control: resizing the whole photo to 192x128 feathers a ~16x upsampled fill well beyond them.
    (resized,) = pipe(image, mask, strategy="resize", **FAST)
    assert np.any(np.asarray(resized)[~inside] != original[~inside])


def test_infer_resize_runs_a_non_square_image(shared_infer, tmp_path):
    image, mask = _photo(640, 384, 21), _mask(640, 384, (300, 150, 360, 200))
    image.save(tmp_path / "photo.png"), mask.save(tmp_path / "mask.png")
    code = shared_infer("--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                        "--out", str(tmp_path / "out.png"), "--strategy", "resize")
    assert code == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (384, 640, 3)
    hole = np.asarray(mask) >= 128
    assert np.any(out[hole] != np.asarray(image)[hole])


def test_strategies_coincide_when_the_short_side_is_at_most_native(pipe):
    # 150x100 resizes to 192x128 either way (the shape the resize test above compiled).
    image, mask = _photo(150, 100, 22), _mask(150, 100, (60, 30, 90, 60))
    (by_crop,) = pipe(image, mask, strategy="crop", **FAST)
    (by_resize,) = pipe(image, mask, strategy="resize", **FAST)
    np.testing.assert_array_equal(np.asarray(by_crop), np.asarray(by_resize))


def test_unknown_strategy_is_refused(pipe):
    with pytest.raises(ValueError, match="strategy"):
        pipe(_photo(128, 128, 23), _mask(128, 128, (1, 1, 20, 20)), strategy="tile", **FAST)
