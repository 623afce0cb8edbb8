"""Host-side pipeline stages against the reference's tiny run,
plus our own paste at original size and robust image/mask loading."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from PIL import Image

from moebius_jax.pipeline.image_io import ImageLoadError, load_image, load_mask
from moebius_jax.pipeline.postprocess import (
    blurred_mask,
    compensation_ring,
    paste,
    paste_back_to_original,
    paste_compensate,
    to_uint8,
)
from moebius_jax.pipeline.preprocess import (
    Prepared,
    batch_prepared,
    binarize_mask,
    load_pair,
    prepare,
    target_size,
)
from conftest import fixture_path, load_npz, nchw_to_nhwc

FIXTURE = "pipeline_tiny"


@pytest.fixture(scope="module")
def stages() -> dict[str, np.ndarray]:
    return load_npz(FIXTURE, "stages.npz")


@pytest.fixture(scope="module")
def prepared() -> Prepared:
    return prepare(*load_pair(fixture_path(FIXTURE, "image_0.png"), fixture_path(FIXTURE, "mask_000000.png")),
                   resolution=128)


def _nhwc0(x: np.ndarray) -> np.ndarray:
    """First sample of an NCHW reference tensor, as a contiguous HWC array."""
    return np.ascontiguousarray(nchw_to_nhwc(x)[0])


def _bit_equal(ours: np.ndarray, ref: np.ndarray) -> bool:
    """Same shape, dtype and bytes (so -0.0 and 0.0 count as different)."""
    return ours.shape == ref.shape and ours.dtype == ref.dtype and ours.tobytes() == ref.tobytes()


def _rng_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _blur_reach(radius: float) -> int:
    """A safe bound on how far Pillow's GaussianBlur spreads a value (measured: ~2.6·radius)."""
    return math.ceil(3 * radius) + 2


# --------------------------------------------------------------------------- reference parity


def test_loaders_match_reference_convert_on_fixture_inputs():
    image_path = fixture_path(FIXTURE, "image_0.png")
    mask_path = fixture_path(FIXTURE, "mask_000000.png")
    with Image.open(image_path) as im:
        assert np.array_equal(np.asarray(load_image(image_path)), np.asarray(im.convert("RGB")))
    with Image.open(mask_path) as im:
        assert np.array_equal(np.asarray(load_mask(mask_path)), np.asarray(im.convert("L")))


def test_prepare_reproduces_reference_stages_bit_for_bit(prepared, stages):
    assert prepared.original_size == (512, 512)
    assert prepared.resized_size == (128, 128)
    assert _bit_equal(prepared.resized_image, stages["pre_resized_image"])
    assert _bit_equal(prepared.resized_mask, stages["pre_resized_mask"])
    # LANCZOS gives the binarised mask grey edges again; they must be kept for the paste.
    assert len(np.unique(prepared.resized_mask)) > 2
    assert _bit_equal(prepared.image, _nhwc0(stages["image"]))
    assert _bit_equal(prepared.mask, _nhwc0(stages["mask"]))
    # Bytes, not values: the hole's negative pixels must be -0.0 as in the reference.
    assert _bit_equal(prepared.masked_image, _nhwc0(stages["masked_image"]))


def test_latent_mask_is_top_left_pixel_of_each_cell(prepared, stages):
    assert _bit_equal(prepared.latent_mask, _nhwc0(stages["resized_masks"]))
    # The fixture distinguishes the two rules: the cell centre (jax "nearest") differs.
    assert np.any(prepared.mask[4::8, 4::8] != prepared.latent_mask)


def test_prepared_arrays_are_read_only(prepared):
    with pytest.raises(ValueError):
        prepared.image[0, 0, 0] = 0.0


def test_to_uint8_matches_reference(stages):
    assert _bit_equal(to_uint8(_nhwc0(stages["decoded_01"])), stages["decoded_uint8"])


def test_paste_matches_reference(prepared, stages):
    assert _bit_equal(blurred_mask(prepared.resized_mask), stages["paste_mask_blurred_uint8"])
    out = paste(stages["decoded_uint8"], prepared.resized_image, prepared.resized_mask)
    assert _bit_equal(out, stages["out_paste"])
    with Image.open(fixture_path(FIXTURE, "out_paste.png")) as png:
        assert _bit_equal(out, np.asarray(png))


def test_no_paste_output_is_the_decoded_image(stages):
    assert _bit_equal(stages["out_nopaste"], stages["decoded_uint8"])
    with Image.open(fixture_path(FIXTURE, "out_nopaste.png")) as png:
        assert _bit_equal(np.asarray(png), to_uint8(_nhwc0(stages["decoded_01"])))


# --------------------------------------------------------------------------- pre-processing


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [
        ((512, 512), 512, (512, 512)),
        ((517, 389), 512, (640, 512)),   # int(517·512/389) = 680 → 640
        ((389, 517), 512, (512, 640)),
        ((1000, 700), 512, (704, 512)),  # int(731.4) = 731 → 704
        ((50, 40), 512, (640, 512)),     # small inputs are upscaled
        ((512, 512), 128, (128, 128)),
        ((300, 200), 100, (128, 64)),    # the short side itself is floored: 100 → 64
    ],
)
def test_target_size(size, resolution, expected):
    assert target_size(*size, resolution) == expected


def test_target_size_refuses_sides_below_64():
    with pytest.raises(ValueError, match="100x63 at resolution 60"):
        target_size(100, 63, 60)


def test_binarize_threshold_is_128():
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8)[None, :])
    out = np.asarray(binarize_mask(ramp))[0]
    assert np.all(out[:128] == 0) and np.all(out[128:] == 255)


def test_mask_is_binarised_before_resizing():
    image = np.zeros((64, 64, 3), np.uint8)
    assert not prepare(*load_pair(image, np.full((64, 64), 127, np.uint8)), 64).mask.any()
    full = prepare(*load_pair(image, np.full((64, 64), 128, np.uint8)), 64)
    assert np.all(full.resized_mask == 255) and np.all(full.latent_mask == 1.0)


def test_prepare_non_square_layout():
    rng = np.random.default_rng(0)
    mask = np.zeros((389, 517), np.uint8)
    mask[100:200, 50:300] = 255
    p = prepare(*load_pair(_rng_image(rng, 389, 517), mask), 512)
    assert (p.original_size, p.resized_size) == ((517, 389), (640, 512))
    assert p.resized_image.shape == (512, 640, 3) and p.resized_mask.shape == (512, 640)
    assert p.image.shape == p.masked_image.shape == (512, 640, 3)
    assert p.mask.shape == (512, 640, 1) and p.latent_mask.shape == (64, 80, 1)
    assert p.image.dtype == p.masked_image.dtype == p.latent_mask.dtype == np.float32
    assert set(np.unique(p.mask)) == {0, 1} and -1.0 <= p.image.min() <= p.image.max() <= 1.0
    assert np.array_equal(p.masked_image[p.mask[..., 0] == 0], p.image[p.mask[..., 0] == 0])
    assert not np.any(p.masked_image[p.mask[..., 0] == 1])


def test_prepare_rejects_mismatched_and_tiny_inputs():
    with pytest.raises(ValueError, match="differs from image size"):
        prepare(Image.new("RGB", (64, 64)), Image.new("L", (65, 64)))
    with pytest.raises(ValueError, match="30x20"):
        prepare(Image.new("RGB", (30, 20)), Image.new("L", (30, 20)), resolution=40)


def test_batch_prepared(prepared):
    other = prepare(Image.new("RGB", (128, 128)), Image.new("L", (128, 128)), 128)
    batch = batch_prepared([prepared, other])
    assert batch["image"].shape == (2, 128, 128, 3)
    assert batch["latent_mask"].shape == (2, 16, 16, 1)
    assert np.array_equal(batch["masked_image"][0], prepared.masked_image)
    assert batch["original_size"].tolist() == [[512, 512], [128, 128]]
    assert batch["resized_size"].tolist() == [[128, 128], [128, 128]]
    wide = prepare(Image.new("RGB", (192, 128)), Image.new("L", (192, 128)), 128)
    with pytest.raises(ValueError, match="different resized sizes"):
        batch_prepared([prepared, wide])
    with pytest.raises(ValueError, match="empty"):
        batch_prepared([])


# --------------------------------------------------------------------------- post-processing


def test_to_uint8_clamps_and_truncates():
    values = np.array([-0.1, 0.0, 0.5, 0.999, 1.0, 1.2, np.nan], dtype=np.float32)
    assert to_uint8(values).tolist() == [0, 0, 127, 254, 255, 255, 0]


@pytest.mark.parametrize("paste_fn", [paste, paste_compensate])
def test_paste_empty_and_full_masks(paste_fn):
    rng = np.random.default_rng(1)
    result, original = _rng_image(rng, 40, 50), _rng_image(rng, 40, 50)
    assert np.array_equal(paste_fn(result, original, np.zeros((40, 50), np.uint8)), original)
    # Full mask: the compensation ring is empty, so no colour shift (the reference gets NaN).
    assert np.array_equal(paste_fn(result, original, np.full((40, 50), 255, np.uint8)), result)


def test_compensation_ring_by_hand():
    hole = np.zeros((64, 64), bool)
    hole[20:40, 24:44] = True
    # bbox 20×20 → 30×30 box around centre (29, 33): rows 29±15, columns 33±15.
    expected = np.zeros_like(hole)
    expected[14:45, 18:49] = True
    expected &= ~hole
    assert np.array_equal(compensation_ring(hole), expected)
    # Clipped at the border: a 4×4 corner hole, centre (1, 1), half-size 7 → rows/cols 0..8.
    corner = np.zeros((64, 64), bool)
    corner[:4, :4] = True
    expected = np.zeros_like(corner)
    expected[:9, :9] = True
    assert np.array_equal(compensation_ring(corner), expected & ~corner)
    # No hole: the whole image is the ring.
    assert compensation_ring(np.zeros((8, 8), bool)).all()


def test_paste_compensate_by_hand():
    # Ring (box 14..44 × 18..48 minus the hole): original (100, 120, 140), result (75, 135, 95)
    # → shift (25, -15, 45), ×1.1 = (27.5, -16.5, 49.5). Outside the box the values differ, so
    # a wrong ring would change the shift.
    original = np.full((64, 64, 3), 250, np.uint8)
    result = np.full((64, 64, 3), 10, np.uint8)
    original[14:45, 18:49] = (100, 120, 140)
    result[14:45, 18:49] = (75, 135, 95)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 24:44] = 255
    mask[21, 25] = 128  # strict > 128: this pixel counts as ring, not hole
    result[20:40, 24:44] = (50, 50, 240)
    result[21, 25] = (75, 135, 95)
    out = paste_compensate(result, original, mask)
    # Where the blurred weight is 1 (rows 28-31, cols 32-35): result + shift, truncated, and
    # clipped at 255.
    hole = mask > 128
    assert np.all(blurred_mask(hole.astype(np.uint8) * 255)[28:32, 32:36] == 255)
    assert np.all(out[28:32, 32:36] == (77, 33, 255))
    # Beyond the blur's reach the original is untouched.
    reach = _blur_reach(3)
    near = np.zeros_like(hole)
    near[20 - reach:40 + reach, 24 - reach:44 + reach] = True
    assert np.array_equal(out[~near], original[~near])


@pytest.mark.parametrize(
    ("height", "width", "resolution", "box"),
    [(389, 517, 512, (150, 210, 200, 240)), (75, 100, 128, (20, 55, 25, 75))],
)
def test_paste_back_to_original_leaves_far_pixels_untouched(height, width, resolution, box):
    rng = np.random.default_rng(2)
    original = _rng_image(rng, height, width)
    mask = np.zeros((height, width), np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 255
    w_t, h_t = target_size(width, height, resolution)
    result = _rng_image(rng, h_t, w_t)
    out = paste_back_to_original(result, original, mask)
    assert out.shape == original.shape and out.dtype == np.uint8

    radius = 3 * max(width / w_t, height / h_t)
    reach = _blur_reach(radius)
    near = np.zeros((height, width), bool)
    near[max(0, top - reach):bottom + reach, max(0, left - reach):right + reach] = True
    assert np.array_equal(out[~near], original[~near])
    compensated = paste_back_to_original(result, original, mask, compensate=True)
    assert np.array_equal(compensated[~near], original[~near])
    # Deep inside the hole: the upsampled result itself.
    upsampled = np.asarray(
        Image.fromarray(result).resize((width, height), Image.Resampling.LANCZOS))
    inner = (slice(top + reach, bottom - reach), slice(left + reach, right - reach))
    assert out[inner].size > 0
    assert np.array_equal(out[inner], upsampled[inner])
    # The feather exists: some pixels near the edge are neither.
    band = near & ~(mask > 0)
    assert np.any((out[band] != original[band]) & (out[band] != upsampled[band]))


def test_paste_back_to_original_empty_and_full_masks():
    rng = np.random.default_rng(3)
    original = _rng_image(rng, 389, 517)
    result = _rng_image(rng, 512, 640)
    empty = paste_back_to_original(result, original, np.zeros((389, 517), np.uint8))
    assert np.array_equal(empty, original)
    full = paste_back_to_original(result, original, np.full((389, 517), 255, np.uint8))
    upsampled = Image.fromarray(result).resize((517, 389), Image.Resampling.LANCZOS)
    assert np.array_equal(full, np.asarray(upsampled))
    with pytest.raises(ValueError, match="differs from image size"):
        paste_back_to_original(result, original, np.zeros((389, 516), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        paste_back_to_original(result / 255.0, original, np.zeros((389, 517), np.uint8))


def test_paste_back_without_resize_equals_reference_paste(prepared, stages):
    """On an input already at the model's size it is the reference paste on the binarised mask."""
    result = stages["decoded_uint8"]
    original, mask = prepared.resized_image, prepared.resized_mask
    binary = np.asarray(binarize_mask(Image.fromarray(mask)))
    assert np.array_equal(paste_back_to_original(result, original, binary),
                          paste(result, original, binary))
    assert np.array_equal(paste_back_to_original(result, original, binary, compensate=True),
                          paste_compensate(result, original, binary))


# --------------------------------------------------------------------------- image loading


def _gradient(width: int = 40, height: int = 30) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_load_image_modes(tmp_path):
    base = _gradient()
    rgb = np.asarray(base)
    grey = np.asarray(base.convert("L"))
    palette = base.convert("P")
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(grey))
    cmyk = base.convert("CMYK")
    u16 = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)  # up to 64746
    u16_as_u8 = np.rint(u16 / 65535 * 255).astype(np.uint8)
    floats = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    binary = (grey > 100)
    grey3 = np.repeat(grey[..., None], 3, -1)
    # file name: (image saved, mode Pillow reads back, expected RGB)
    cases = {
        "rgb.png": (base, "RGB", rgb),
        "rgba.png": (rgba, "RGBA", rgb),  # alpha dropped, colour kept
        "p.png": (palette, "P", np.asarray(palette.convert("RGB"))),
        "p_transparent.png": (palette_t, "P", np.asarray(palette.convert("RGB"))),
        "l.png": (base.convert("L"), "L", grey3),
        "la.png": (rgba.convert("LA"), "LA", grey3),
        "cmyk.tif": (cmyk, "CMYK", np.asarray(cmyk.convert("RGB"))),
        "i16.png": (Image.fromarray(u16), "I;16", np.repeat(u16_as_u8[..., None], 3, -1)),
        "i32.tif": (Image.fromarray(u16.astype(np.int32)), "I",
                    np.repeat(u16_as_u8[..., None], 3, -1)),
        "f.tif": (Image.fromarray(floats), "F", np.repeat(np.rint(floats * 255)[..., None], 3, -1)),
        "one.png": (Image.fromarray(binary), "1", np.repeat(binary[..., None] * 255, 3, -1)),
    }
    for name, (image, stored_mode, expected) in cases.items():
        path = _save(image, tmp_path / name)
        with Image.open(path) as check:
            assert check.mode == stored_mode, name
        loaded = load_image(path)
        assert loaded.mode == "RGB" and loaded.size == (40, 30), name
        assert np.array_equal(np.asarray(loaded), expected.astype(np.uint8)), name
    # The 16-bit ramp spans the range: Pillow's own convert would have clipped most of it.
    assert u16_as_u8.max() > 250 and len(np.unique(u16_as_u8)) > 200


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 40000, 65535]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as check:
        assert check.mode == "I;16"
        assert np.asarray(check.convert("L")).tolist() == [[0, 255, 255, 255, 255, 255]]
    assert np.asarray(load_image(path))[..., 0].tolist() == [[0, 1, 4, 128, 156, 255]]
    assert np.asarray(load_mask(path)).tolist() == [[0, 1, 4, 128, 156, 255]]


def test_load_mask_modes(tmp_path):
    shape = np.zeros((30, 40), np.uint8)
    shape[5:20, 10:30] = 255
    shape[25, 0] = 128
    flat_white = np.dstack([np.full((30, 40, 3), 255, np.uint8), shape])
    strokes_on_black = np.dstack([np.repeat(shape[..., None], 3, -1), shape])
    red = np.zeros((30, 40, 3), np.uint8)
    red[..., 0] = shape
    grey_rgb = np.repeat(shape[..., None], 3, -1)
    opaque_black = np.zeros((30, 40, 4), np.uint8)
    opaque_black[..., 3] = 255  # flat colour and flat alpha: the colour (black) decides
    cases = {
        "l.png": (Image.fromarray(shape), shape),
        "one.png": (Image.fromarray(shape > 0), (shape > 0) * 255),
        "grey_rgb.png": (Image.fromarray(grey_rgb), shape),           # = convert("L")
        "red_rgb.png": (Image.fromarray(red), shape),                 # luma would give 76
        "alpha_shape.png": (Image.fromarray(flat_white), shape),
        "black_alpha_shape.png": (Image.fromarray(np.dstack([red * 0, shape])), shape),
        # Colour and alpha both vary: colour·alpha/255, so the grey 128 pixel becomes 64.
        "strokes_on_black.png": (Image.fromarray(strokes_on_black),
                                 (shape.astype(int) ** 2 + 127) // 255),
        "opaque_grey.png": (Image.fromarray(np.dstack([grey_rgb, shape * 0 + 255])), shape),
        "opaque_black.png": (Image.fromarray(opaque_black), shape * 0),
        "la_shape.png": (Image.fromarray(np.dstack([shape * 0 + 200, shape])), shape),
        "p.png": (Image.fromarray(shape).convert("P"), shape),
        "i16.png": (Image.fromarray(shape.astype(np.uint16) * 257), shape),
        "f.tif": (Image.fromarray(shape.astype(np.float32) / 255), shape),
    }
    for name, (image, expected) in cases.items():
        path = _save(image, tmp_path / name)
        loaded = load_mask(path)
        assert loaded.mode == "L" and loaded.size == (40, 30), name
        assert np.array_equal(np.asarray(loaded), np.asarray(expected, np.uint8)), name


def test_partly_transparent_colour_mask_composites_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [[[200, 0, 0], [0, 100, 0]], [[255, 255, 255], [0, 0, 0]]]
    rgba[..., 3] = [[255, 128], [0, 255]]
    assert np.asarray(load_mask(rgba)).tolist() == [[200, 50], [0, 0]]


def test_load_from_arrays_and_pil():
    rng = np.random.default_rng(4)
    rgb = _rng_image(rng, 6, 5)
    grey = rgb[..., 0]
    for array in (grey, grey[..., None]):
        assert np.array_equal(np.asarray(load_image(array)), np.repeat(grey[..., None], 3, -1))
        assert np.array_equal(np.asarray(load_mask(array)), grey)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    rgba = np.dstack([rgb, grey])
    assert np.array_equal(np.asarray(load_image(rgba)), rgb)
    assert np.array_equal(np.asarray(load_mask(grey > 127)), (grey > 127) * 255)
    deep = np.array([[0, 65535, 32896]], np.uint16)
    assert np.asarray(load_mask(deep)).tolist() == [[0, 255, 128]]
    assert np.asarray(load_mask(deep.astype(">u2"))).tolist() == [[0, 255, 128]]
    floats = np.array([[0.0, 0.5, 1.0, 1.01, -0.01]], np.float64)
    assert np.asarray(load_mask(floats)).tolist() == [[0, 128, 255, 255, 0]]

    # The result never aliases the input.
    loaded = load_image(rgb)
    rgb[...] = 0
    assert np.asarray(loaded).any()
    pil = Image.fromarray(rgba)
    before = pil.tobytes()
    load_image(pil)
    load_mask(pil)
    assert pil.mode == "RGBA" and pil.tobytes() == before


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 4), np.int64), "unsupported dtype int64"),
        (np.zeros((4, 4, 2), np.uint8), "expected shape"),
        (np.zeros((4,), np.uint8), "expected shape"),
        (np.zeros((0, 4), np.uint8), "empty"),
        (np.full((4, 4), 255.0, np.float32), "must lie in"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_arrays_are_refused(array, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(array)


def test_exif_orientation_is_applied_and_file_untouched(tmp_path):
    # Stored 40×20, left half red; orientation 6 = shown rotated 90° clockwise → 20×40, red on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(stored), tmp_path / "rotated.jpg", exif=exif, quality=95)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    image = np.asarray(load_image(path)).astype(int)
    assert image.shape == (40, 20, 3)
    assert np.all(image[:16, :, 0] > 200) and np.all(image[:16, :, 2] < 60)
    assert np.all(image[24:, :, 2] > 200) and np.all(image[24:, :, 0] < 60)
    assert load_mask(path).size == (20, 40)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_unreadable_files_raise_image_load_error(tmp_path):
    good = _save(_gradient(200, 150), tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"definitely not an image")
    for path in (truncated, garbage, tmp_path / "missing.png"):
        for loader in (load_image, load_mask):
            with pytest.raises(ImageLoadError, match=path.name) as info:
                loader(path)
            assert isinstance(info.value, ValueError) and info.value.reason
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(truncated)
    with pytest.raises(TypeError):
        load_image(b"bytes are not a source")
