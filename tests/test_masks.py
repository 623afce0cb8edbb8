"""LaMa-style random masks (the reference's training generator): config loading, draw order, geometry, statistics."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

from moebius_jax.data.masks import (
    SHIPPED_CONFIG_DIR,
    BoxMaskParams,
    IrregularMaskParams,
    MaskConfigError,
    MaskGeneratorConfig,
    Segment,
    generate_mask,
    load_mask_config,
    mask_rng,
    mixture_probabilities,
    rasterise_boxes,
    rasterise_strokes,
    sample_boxes,
    sample_strokes,
    shipped_mask_configs,
)

NAMES = [f"random_{w}_{s}" for w in ("thin", "medium", "thick") for s in (256, 512)]

# The reference's settings: irregular (min_times, max_times, max_width, max_angle, max_len),
# box_proba, box (margin, bbox_min_size, bbox_max_size, min_times, max_times).
SPEC_TABLE = {
    "random_thin_256": ((4, 50, 10, 4, 40), 0, None),
    "random_thin_512": ((4, 70, 20, 4, 100), 0, None),
    "random_medium_256": ((4, 5, 50, 4, 100), 0.3, (0, 10, 50, 1, 5)),
    "random_medium_512": ((4, 10, 100, 4, 200), 0.3, (0, 30, 150, 1, 5)),
    "random_thick_256": ((1, 5, 100, 4, 200), 0.3, (10, 30, 150, 1, 3)),
    "random_thick_512": ((1, 5, 250, 4, 450), 0.3, (10, 30, 300, 1, 4)),
}

MEDIUM_YAML = """\
generator_kind: random
mask_generator_kwargs:
  irregular_proba: 1
  irregular_kwargs: {min_times: 4, max_times: 10, max_width: 100, max_angle: 4, max_len: 200}
  box_proba: 0.3
  box_kwargs: {margin: 0, bbox_min_size: 30, bbox_max_size: 150, max_times: 5, min_times: 1}
  segm_proba: 0
  squares_proba: 0
max_masks_per_image: 1
cropping: {out_min_size: 512}
max_tamper_area: 0.5
"""


def _boxes_only(margin: int, lo: int, hi: int, n: int = 1) -> MaskGeneratorConfig:
    box = BoxMaskParams(margin=margin, bbox_min_size=lo, bbox_max_size=hi, min_times=n, max_times=n)
    return MaskGeneratorConfig(irregular_proba=0, irregular=None, box_proba=1, box=box)


# ------------------------------------------------------------------------------ config files


@pytest.mark.parametrize("name", NAMES)
def test_shipped_config_matches_reference_and_spec(name: str, fixtures_dir: pathlib.Path) -> None:
    shipped = SHIPPED_CONFIG_DIR / f"{name}.yaml"
    assert shipped.read_bytes() == (fixtures_dir / "mask_configs" / f"{name}.yaml").read_bytes()
    config = load_mask_config(name)
    assert config == load_mask_config(shipped) == load_mask_config(str(shipped))
    irregular, box_proba, box = SPEC_TABLE[name]
    p = config.irregular
    assert (p.min_times, p.max_times, p.max_width, p.max_angle, p.max_len) == irregular
    assert config.irregular_proba == 1 and config.box_proba == box_proba
    assert config.invert_proba == 0
    if box is None:  # thin: variants_n is accepted and ignored; strokes only
        assert config.box is None
        np.testing.assert_array_equal(mixture_probabilities(config), [1.0])
    else:
        b = config.box
        assert (b.margin, b.bbox_min_size, b.bbox_max_size, b.min_times, b.max_times) == box


def test_all_shipped_configs_listed() -> None:
    assert shipped_mask_configs() == sorted(NAMES)


def test_mixture_probabilities_float32() -> None:
    probs = mixture_probabilities(load_mask_config("random_medium_512"))
    assert probs.dtype == np.float32
    # §4.1's values, printed there to 7 digits.
    np.testing.assert_allclose(probs, [0.7692308, 0.2307692], rtol=1e-6)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ([("max_tamper_area: 0.5", "max_tamper_ares: 0.5")], "max_tamper_ares"),
        ([("segm_proba: 0", "segm_proba: 0\n  lama_proba: 0")], "lama_proba"),
        ([("max_len: 200}", "max_len: 200, draw_method: line}")], "draw_method"),
        ([("max_angle: 4, ", "")], "max_angle"),
        ([("  box_proba: 0.3\n", "")], "box_proba"),
        ([("squares_proba: 0", "squares_proba: 0.1")], "squares_proba"),
        ([("margin: 0", "margin: -1")], "margin"),
        ([("max_width: 100", "max_width: 1.5")], "max_width"),
        (
            [("irregular_proba: 1", "irregular_proba: 0"), ("box_proba: 0.3", "box_proba: 0")],
            "both 0",
        ),
    ],
)
def test_bad_config_names_file_and_key(
    tmp_path: pathlib.Path, edits: list[tuple[str, str]], message: str
) -> None:
    text = MEDIUM_YAML
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MaskConfigError) as err:
        load_mask_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_config_accepted_keys(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(MEDIUM_YAML)
    assert load_mask_config(path) == load_mask_config("random_medium_512")
    path.write_text(MEDIUM_YAML.replace("segm_proba: 0", "segm_proba: 0.5\n  invert_proba: 0.25"))
    with pytest.warns(UserWarning, match="segm_proba > 0 is ignored"):
        config = load_mask_config(path)
    assert config.invert_proba == 0.25
    # segm is not mixed in: the probabilities are those of strokes and boxes alone.
    np.testing.assert_allclose(mixture_probabilities(config), [0.7692308, 0.2307692], rtol=1e-6)


def test_unknown_name_lists_shipped() -> None:
    with pytest.raises(MaskConfigError, match="random_medium_512"):
        load_mask_config("random_huge_512")


# ------------------------------------------------------------------------------ streams and format


def test_mask_rng_reproducible_and_independent() -> None:
    config = load_mask_config("random_thin_256")
    base = (42, 1000, 0, 1)
    reference = generate_mask(config, mask_rng(*base), 256, 256)
    np.testing.assert_array_equal(reference, generate_mask(config, mask_rng(*base), 256, 256))
    for position in range(4):
        changed = list(base)
        changed[position] += 1
        other = generate_mask(config, mask_rng(*changed), 256, 256)
        assert not np.array_equal(reference, other), f"changing argument {position} kept the mask"
    # A training loop may hand over NumPy integers (or JAX scalars) for the step.
    np.testing.assert_array_equal(
        reference, generate_mask(config, mask_rng(42, np.int64(1000), 0, 1), 256, 256)
    )
    with pytest.raises(ValueError, match="step"):
        mask_rng(0, -1, 0, 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("height", "width"), [(512, 768), (200, 300)])
def test_mask_format(name: str, height: int, width: int) -> None:
    config = load_mask_config(name)
    values = set()
    for sample in range(5):
        mask = generate_mask(config, mask_rng(0, 0, 0, sample), height, width)
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        values |= set(np.unique(mask).tolist())
    assert values == {0, 255}  # a single thick mask may cover the whole image


def test_invert() -> None:
    config = dataclasses.replace(_boxes_only(0, 10, 20), invert_proba=1.0)
    plain = generate_mask(_boxes_only(0, 10, 20), mask_rng(0, 0, 0, 0), 64, 64)
    np.testing.assert_array_equal(generate_mask(config, mask_rng(0, 0, 0, 0), 64, 64), 255 - plain)


# ------------------------------------------------------------------ draw order (§4.1-4.3)


def test_generate_mask_replays_spec_draw_order() -> None:
    """One choice draw picks the kind (normalised probabilities), then that generator draws."""
    config = load_mask_config("random_medium_256")
    kinds = set()
    for sample in range(40):
        replay = mask_rng(3, 0, 0, sample)
        kind = int(replay.choice(2, p=np.array([0.7692308, 0.2307692], np.float32)))
        kinds.add(kind)
        if kind == 0:
            strokes = sample_strokes(config.irregular, replay, 200, 300)
            expected = rasterise_strokes(strokes, 200, 300)
        else:
            expected = rasterise_boxes(sample_boxes(config.box, replay, 200, 300), 200, 300)
        got = generate_mask(config, mask_rng(3, 0, 0, sample), 200, 300)
        np.testing.assert_array_equal(got, expected.astype(np.uint8) * 255)
    assert kinds == {0, 1}


def test_stroke_draws_in_spec_order() -> None:
    params = IrregularMaskParams(max_angle=4, max_len=40, max_width=10, min_times=2, max_times=6)
    height, width = 100, 150
    for seed in range(20):
        strokes = sample_strokes(params, np.random.default_rng(seed), height, width)
        rng = np.random.default_rng(seed)
        n = rng.integers(2, 8)  # [min_times, max_times + 1] inclusive
        assert len(strokes) == n
        for i, stroke in enumerate(strokes):
            x, y = rng.integers(0, width), rng.integers(0, height)
            assert len(stroke) == 1 + rng.integers(0, 5)
            for seg in stroke:
                angle = 0.01 + rng.integers(0, 4)
                angle = 2 * 3.1415926 - angle if i % 2 == 0 else angle
                length, brush = 10 + rng.integers(0, 40), 5 + rng.integers(0, 10)
                x1 = np.clip(np.int32(x + length * np.sin(angle)), 0, width)
                y1 = np.clip(np.int32(y + length * np.cos(angle)), 0, height)
                assert seg == Segment(x, y, x1, y1, angle, length, brush)
                x, y = x1, y1


def test_stroke_counts_angles_and_ranges() -> None:
    params = IrregularMaskParams(max_angle=4, max_len=20, max_width=7, min_times=3, max_times=3)
    counts, seg_counts, widths, lengths = set(), set(), set(), set()
    angles: dict[int, set[float]] = {0: set(), 1: set()}
    rng = np.random.default_rng(0)
    for _ in range(300):
        strokes = sample_strokes(params, rng, 64, 64)
        counts.add(len(strokes))
        for i, stroke in enumerate(strokes):
            seg_counts.add(len(stroke))
            assert all(a.x1 == b.x0 and a.y1 == b.y0 for a, b in zip(stroke, stroke[1:]))
            for seg in stroke:
                angles[i % 2].add(round(seg.angle, 6))
                widths.add(seg.width)
                lengths.add(seg.length)
                assert 0 <= seg.x1 <= 64 and 0 <= seg.y1 <= 64  # clipped to the size, inclusive
    assert counts == {3, 4}  # min_times == max_times still draws max_times + 1 sometimes
    assert seg_counts == {1, 2, 3, 4, 5}
    assert angles[1] == {0.01, 1.01, 2.01, 3.01}  # odd strokes
    assert angles[0] == {round(2 * 3.1415926 - a, 6) for a in (0.01, 1.01, 2.01, 3.01)}  # even
    assert widths == set(range(5, 12)) and lengths == set(range(10, 30))


def test_box_draws_in_spec_order() -> None:
    params = BoxMaskParams(margin=5, bbox_min_size=10, bbox_max_size=40, min_times=1, max_times=4)
    side_end = min(40 + 1, 60 - 2 * 5, 90 - 2 * 5)  # bmax for a 60x90 image
    for seed in range(20):
        boxes = sample_boxes(params, np.random.default_rng(seed), 60, 90)
        rng = np.random.default_rng(seed)
        assert len(boxes) == rng.integers(1, 5)
        for box in boxes:
            w, h = rng.integers(10, side_end), rng.integers(10, side_end)
            x, y = rng.integers(5, 90 - 5 - w + 1), rng.integers(5, 60 - 5 - h + 1)
            assert box == (x, y, w, h)


@pytest.mark.parametrize(
    ("height", "width", "margin", "lo", "hi"), [(256, 256, 10, 30, 150), (64, 96, 10, 5, 300)]
)
def test_single_box_geometry(height: int, width: int, margin: int, lo: int, hi: int) -> None:
    """The bounding box of a one-box mask: sides in [bbox_min, bmax - 1], inside the margin."""
    config = _boxes_only(margin, lo, hi)
    side_end = min(hi + 1, height - 2 * margin, width - 2 * margin)  # bmax, §4.3
    sides = set()
    for sample in range(300):
        hole = generate_mask(config, mask_rng(1, 0, 0, sample), height, width) > 0
        rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
        top, left, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert hole.sum() == h * w  # a filled rectangle
        assert lo <= h <= side_end - 1 and lo <= w <= side_end - 1
        assert margin <= top and top + h <= height - margin
        assert margin <= left and left + w <= width - margin
        sides |= {h, w}
    assert min(sides) < lo + 10 and max(sides) > side_end - 11  # the whole side range is used


def test_box_too_large_for_image() -> None:
    with pytest.raises(ValueError, match="no room"):
        generate_mask(_boxes_only(10, 30, 150), mask_rng(0, 0, 0, 0), 40, 200)


# ------------------------------------------------------------------------------ rasterisation


@pytest.mark.parametrize(
    ("thickness", "opencv_extent"), [(5, 7), (6, 7), (10, 11), (20, 21), (21, 23)]
)
def test_stroke_footprint_matches_opencv(thickness: int, opencv_extent: int) -> None:
    """A horizontal cv2.line of thickness t covers these many rows (measured with OpenCV 5.0)."""
    seg = Segment(20, 50, 80, 50, 0.0, 60, thickness)
    hole = rasterise_strokes([[seg]], 100, 120)
    assert hole[:, 50].sum() == opencv_extent
    radius = (thickness + 1) // 2
    assert hole[50, 80 + radius] and not hole[50, 81 + radius]  # round cap of OpenCV's radius
    assert hole[50, 20 - radius] and not hole[50, 19 - radius]


def test_dot_area_close_to_opencv() -> None:
    """A zero-length thickness-50 line: OpenCV fills the 1961-pixel disc of radius 25."""
    hole = rasterise_strokes([[Segment(60, 60, 60, 60, 0.0, 10, 50)]], 120, 120)
    assert abs(hole.sum() - 1961) / 1961 < 0.04


# ------------------------------------------------------------------------------ statistics

# Hole-area fraction at each setting's native square size, measured over 20,000 draws
# (mask_rng(12345, i, 0, 0)). The last two columns compare, on 2,000 identical draws
# (mask_rng(7, i, 0, 0)), our Pillow strokes with the same strokes drawn by cv2.line
# (OpenCV 5.0, by hand, not in these tests): ratio of mean hole areas, and mean IoU.
#   setting     mean    sd     p5 / p25 / p50 / p75 / p95          ours/cv2  IoU
#   thin_256    0.2967  0.133  0.074 / 0.187 / 0.308 / 0.410 / 0.491  1.0073    0.961
#   thin_512    0.2948  0.137  0.064 / 0.182 / 0.307 / 0.413 / 0.493  1.0029    0.976
#   medium_256  0.2459  0.135  0.020 / 0.156 / 0.270 / 0.345 / 0.440  1.0078    0.988
#   medium_512  0.3070  0.159  0.044 / 0.176 / 0.322 / 0.431 / 0.548  1.0041    0.993
#   thick_256   0.4040  0.220  0.078 / 0.219 / 0.385 / 0.582 / 0.773  1.0037    0.993
#   thick_512   0.4576  0.248  0.077 / 0.246 / 0.450 / 0.667 / 0.855  1.0014    0.997
# The bounds are mean ± 4 standard errors of a 250-draw mean, rounded outward.
AREA_BOUNDS = {
    "random_thin_256": (0.26, 0.335),
    "random_thin_512": (0.26, 0.33),
    "random_medium_256": (0.21, 0.28),
    "random_medium_512": (0.265, 0.35),
    "random_thick_256": (0.345, 0.46),
    "random_thick_512": (0.39, 0.525),
}


@pytest.mark.parametrize("name", NAMES)
def test_hole_area_fraction(name: str) -> None:
    config, size = load_mask_config(name), int(name.rsplit("_", 1)[1])
    fractions = [
        (generate_mask(config, mask_rng(0, 0, 0, i), size, size) > 0).mean() for i in range(250)
    ]
    lo, hi = AREA_BOUNDS[name]
    assert lo <= float(np.mean(fractions)) <= hi
