"""InpaintPipeline and infer.py end to end with the tiny student and tiny VAE."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import fixture_path
from PIL import Image, ImageDraw

import infer
from moebius_jax.pipeline import inpaint
from moebius_jax.pipeline.preprocess import hole_mask

WEIGHTS = fixture_path("moebius_tiny", "diffusion_pytorch_model.bin")
VAE = fixture_path("vae_tiny")
CONFIG = fixture_path("moebius_tiny", "config.yaml")
FAST = dict(steps=2)  # strength 0.99 keeps 1 step: the scan body compiles the same, runs 19x faster


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def _mask(w: int, h: int, box) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def _far_from(mask: Image.Image, margin: int) -> np.ndarray:
    hole = np.asarray(mask) >= 128
    ys, xs = np.nonzero(hole)
    far = np.ones_like(hole)
    far[max(ys.min() - margin, 0):ys.max() + margin + 1, max(xs.min() - margin, 0):xs.max() + margin + 1] = False
    return far


def test_output_keeps_the_input_size_and_pixels_away_from_the_mask(pipe):
    image, mask = _photo(150, 100, 0), _mask(150, 100, (60, 30, 90, 60))
    (out,) = pipe([image], [mask], **FAST)
    assert out.size == image.size and out.mode == "RGB"
    far = _far_from(mask, 12)
    np.testing.assert_array_equal(np.asarray(out)[far], np.asarray(image)[far])
    assert np.any(np.asarray(out)[~far] != np.asarray(image)[~far])  # the hole really was filled


def test_reference_size_output_and_batching_invariance(pipe):
    a, b = _photo(150, 100, 1), _photo(300, 200, 2)
    ma, mb = _mask(150, 100, (10, 10, 50, 50)), _mask(300, 200, (100, 50, 200, 150))
    together = pipe([a, b], [ma, mb], reference_size=True, batch_size=2, **FAST)
    one_by_one = pipe([a, b], [ma, mb], reference_size=True, batch_size=1, **FAST)
    assert together[0].size == together[1].size == (192, 128)
    # Same noise either way; a batched conv may round differently, so allow a few +-1 pixels.
    for x, y in zip(together, one_by_one):
        diff = np.abs(np.asarray(x, int) - np.asarray(y, int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size


def test_empty_mask_returns_the_input_without_running_the_model(pipe):
    image = _photo(128, 128, 3)
    before = pipe.timing.images
    (out,) = pipe(image, Image.new("L", (128, 128), 0), **FAST)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))
    assert pipe.timing.images == before


def test_bad_inputs_are_named(pipe, tmp_path):
    image = _photo(150, 100, 4)
    with pytest.raises(ValueError, match="150x100.*120x80"):
        pipe(image, _mask(120, 80, (1, 1, 20, 20)), **FAST)
    with pytest.raises(ValueError, match="at least 64"):
        pipe(_photo(40, 30, 5), _mask(40, 30, (1, 1, 10, 10)), **FAST)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png"):
        pipe(broken, _mask(150, 100, (1, 1, 20, 20)), **FAST)
    assert pipe([broken], [_mask(150, 100, (1, 1, 20, 20))], on_error="skip", **FAST) == [None]


def test_infer_folder_of_mixed_photos(tmp_path, caplog, commands_use_tiny_pipeline):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    cases = {
        "rgb": (_photo(150, 100, 6), "jpg"),
        "rgba": (_photo(300, 200, 7).convert("RGBA"), "png"),
        "gray": (_photo(128, 128, 8).convert("L"), "png"),
        "cmyk": (_photo(150, 100, 9).convert("CMYK"), "jpg"),
        "deep": (Image.fromarray((np.asarray(_photo(128, 128, 10).convert("L")).astype(np.uint16) * 257)), "png"),
    }
    for name, (image, suffix) in cases.items():
        image.save(images / f"{name}.{suffix}")
        w, h = image.size
        _mask(w, h, (w // 3, h // 3, w // 2, h // 2)).save(masks / f"{name}.png")
    _photo(128, 128, 11).save(images / "orphan.png")
    originals = {p.name: p.read_bytes() for p in images.iterdir()}

    code = infer.main(["--weights", str(WEIGHTS), "--vae", str(VAE), "--config", str(CONFIG),
                       "--image-dir", str(images), "--mask-dir", str(masks), "--out-dir", str(out),
                       "--steps", "2", "--batch-size", "4"])
    assert code == 0
    assert "orphan.png" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in cases)
    for name, (image, _) in cases.items():
        result = Image.open(out / f"{name}.png")
        assert result.size == image.size
        source = Image.open(next(images.glob(f"{name}.*")))
        expected = np.asarray(source.convert("RGB")) if name != "deep" else None
        far = _far_from(Image.open(masks / f"{name}.png"), 12)
        if expected is not None and source.format != "JPEG":
            np.testing.assert_array_equal(np.asarray(result)[far], expected[far])
    assert {p.name: p.read_bytes() for p in images.iterdir()} == originals  # inputs untouched


def test_infer_refuses_to_overwrite_its_input(tmp_path):
    image = tmp_path / "a.png"
    _photo(128, 128, 12).save(image)
    mask = tmp_path / "m.png"
    _mask(128, 128, (10, 10, 40, 40)).save(mask)
    before = image.read_bytes()
    code = infer.main(["--weights", str(WEIGHTS), "--vae", str(VAE), "--config", str(CONFIG),
                       "--image", str(image), "--mask", str(mask), "--out", str(image)])
    assert code == 1 and image.read_bytes() == before


def test_hole_mask_dilates_like_opencv():
    """OpenCV's dilation by a k x k square, anchored at k // 2, after binarising (hand-worked)."""
    mask = np.zeros((7, 7), np.uint8)
    mask[3, 3], mask[0, 6] = 128, 127  # one hole pixel; one pixel just under the threshold
    def grown(k):
        return np.asarray(hole_mask(Image.fromarray(mask), k)) // 255
    assert grown(0).tolist() == (mask >= 128).astype(int).tolist()
    expected = {3: (slice(2, 5), slice(2, 5)), 2: (slice(3, 5), slice(3, 5)), 4: (slice(2, 6), slice(2, 6))}
    for k, box in expected.items():  # even k: one pixel less towards the top and left
        want = np.zeros((7, 7), int)
        want[box] = 1
        assert grown(k).tolist() == want.tolist(), k
    with pytest.raises(ValueError, match="mask_dilate"):
        hole_mask(Image.fromarray(mask), -1)


def test_mask_dilate_equals_a_hand_dilated_mask(pipe):
    image = _photo(150, 100, 13)
    dilated = pipe(image, _mask(150, 100, (60, 30, 90, 60)), mask_dilate=5, **FAST)
    by_hand = pipe(image, _mask(150, 100, (58, 28, 92, 62)), **FAST)  # 2 px more on every side
    np.testing.assert_array_equal(np.asarray(dilated[0]), np.asarray(by_hand[0]))
    with pytest.raises(ValueError, match="mask_dilate"):
        pipe(image, _mask(150, 100, (60, 30, 90, 60)), mask_dilate=-1, **FAST)


def test_random_seed_is_reported_and_reproduces(pipe, monkeypatch, caplog):
    image, mask = _photo(150, 100, 14), _mask(150, 100, (60, 30, 90, 60))
    monkeypatch.setattr(inpaint.secrets, "randbelow", lambda n: 4242)
    with caplog.at_level(logging.INFO, logger="moebius_jax.pipeline.inpaint"):
        (drawn,) = pipe(image, mask, seed=-1, **FAST)
    assert pipe.last_seed == 4242 and "random seed: 4242" in caplog.text
    (again,) = pipe(image, mask, seed=4242, **FAST)
    (other,) = pipe(image, mask, seed=0, **FAST)
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(again))
    assert not np.array_equal(np.asarray(drawn), np.asarray(other))
    with pytest.raises(ValueError, match="-1"):
        pipe(image, mask, seed=-2, **FAST)


def test_infer_new_flags(tmp_path, monkeypatch, capsys, commands_use_tiny_pipeline):
    image, mask, out = tmp_path / "a.png", tmp_path / "m.png", tmp_path / "r.png"
    _photo(150, 100, 15).save(image)
    _mask(150, 100, (60, 30, 90, 60)).save(mask)
    monkeypatch.setattr(inpaint.secrets, "randbelow", lambda n: 77)
    code = infer.main(["--weights", str(WEIGHTS), "--vae", str(VAE), "--config", str(CONFIG), "--image", str(image),
                       "--mask", str(mask), "--out", str(out), "--steps", "2", "--seed", "-1", "--mask-dilate", "5"])
    assert code == 0 and out.exists()
    report = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert report["seed"] == 77 and report["images"] == 1
    args = infer.parse_args(["--image", "a", "--mask", "m", "--out", "o", "--cfg-until", "5", "--variant", "ft_ffhq"])
    assert (args.cfg_until, args.variant, args.weights, args.vae) == (5, "ft_ffhq", None, None)
    for bad in (["--seed", "-2"], ["--mask-dilate", "-1"], ["--cfg-until", "-1"], ["--variant", "ft_pets"]):
        with pytest.raises(SystemExit):
            infer.parse_args(["--image", "a", "--mask", "m", "--out", "o", *bad])
    assert infer.main(["--image", str(image), "--mask", str(mask), "--out", str(tmp_path / "x.png"),
                       "--variant", "ft_ffhq", "--weights", str(WEIGHTS)]) == 1  # which student? refused
