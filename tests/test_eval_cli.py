"""The evaluation commands end to end on CPU: make_benchmark, run (resume included) and score.

A tiny benchmark (five synthetic photos of mixed sizes and modes, 128 px, our medium masks) is
inpainted by the tiny student and tiny VAE, and scored with the eval fixtures' key-seeded
metric backbones (regenerated, written as torch files, passed by path like real ones).
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import sys

import numpy as np
import pytest
from conftest import TINY_STUDENT_CONFIG, TINY_STUDENT_WEIGHTS, TINY_VAE, commands_use
from eval_weights import inception_state_dict, lpips_backbone_state_dict
from PIL import Image, ImageDraw

from moebius_jax.convert.torch_pickle import save_torch_file
from moebius_jax.eval import image_metrics, make_benchmark, run, score
from moebius_jax.eval.benchmark import Manifest, crop_and_resize, read_manifest

TINY = ["--weights", str(TINY_STUDENT_WEIGHTS), "--vae", str(TINY_VAE), "--config", str(TINY_STUDENT_CONFIG),
        "--steps", "2", "--batch-size", "2"]  # strength 0.99 keeps 1 step: fast, same compiled loop
RESOLUTION = 128
# The key-seeded Inception has dead channels, so pytorch-fid's eps fallback runs (and warns).
pytestmark = pytest.mark.filterwarnings("ignore:FID. the covariance product is singular:RuntimeWarning")
# (name, size, mode, format): a non-square crop, a larger one to resize, grey and alpha inputs.
PHOTOS = [("beach", (160, 128), "RGB", "JPEG"), ("door", (128, 200), "L", "PNG"), ("field", (256, 256), "RGB", "PNG"),
          ("glass", (300, 180), "RGBA", "PNG"), ("hill", (128, 128), "RGB", "PNG")]


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3)) + rng.normal(0, 15, (h, w, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, w // 2, h // 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _build(*args: str) -> int:
    return make_benchmark.main([*args, "--resolution", str(RESOLUTION)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("photos")
    for seed, (name, size, mode, fmt) in enumerate(PHOTOS):
        _photo(size, seed).convert(mode).save(folder / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
    return folder


@pytest.fixture(scope="module")
def bench(photos, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    assert _build("--images", str(photos), "--mask-setting", "random_medium_256", "--seed", "3",
                  "--name", "Tiny photos", "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("metric_weights")
    save_torch_file(folder / "pt_inception-2015-12-05-6726825d.pth", inception_state_dict())
    save_torch_file(folder / "alexnet-owt-7be5be79.pth", lpips_backbone_state_dict("alex"))
    return {"fid": str(folder / "pt_inception-2015-12-05-6726825d.pth"),
            "lpips": str(folder / "alexnet-owt-7be5be79.pth")}


@pytest.fixture(scope="module")
def loaded_pipelines(tiny_pipeline):
    """eval.run gets the session's tiny pipeline: a fresh pipeline compiles its sampler again
    (~15 s per batch shape on CPU). Yields each load's arguments."""
    with commands_use(tiny_pipeline) as loads:
        yield loads


@pytest.fixture(scope="module")
def resumed(bench, metric_weights, loaded_pipelines, tmp_path_factory) -> dict:
    """An interrupted run (first 2 pairs, no metric weights), a broken prediction and a stray
    temporary file, then the full run with every metric; what each step left behind."""
    out = tmp_path_factory.mktemp("run") / "out"
    pred = out / "pred"
    args = [*TINY, "--benchmark", str(bench), "--out", str(out)]
    assert run.main([*args, "--limit", "2"]) == 0
    first = {
        "files": sorted(p.name for p in pred.iterdir()),
        "metrics": json.loads((out / "metrics.json").read_text()),
        "table": (out / "metrics.md").read_text(),
    }
    stems = [p.stem for p in read_manifest(bench).pairs]
    kept, broken = pred / f"{stems[0]}.png", pred / f"{stems[1]}.png"
    first["kept"] = (kept.stat().st_mtime_ns, kept.stat().st_ino, kept.read_bytes())
    first["broken"] = broken.read_bytes()
    broken.write_bytes(first["broken"][: len(first["broken"]) // 2])  # a write cut short by a crash
    (pred / f".{stems[2]}.png.0123abcd.tmp").write_bytes(b"partial")  # an interrupted atomic write
    assert run.main([*args, "--fid-weights", metric_weights["fid"], "--lpips-backbone", metric_weights["lpips"]]) == 0
    return {"out": out, "stems": stems, "first": first, "metrics": json.loads((out / "metrics.json").read_text()),
            "table": (out / "metrics.md").read_text()}


# -- make_benchmark --------------------------------------------------------------------------


def test_benchmark_folder(bench, photos):
    manifest = read_manifest(bench)
    assert manifest.name == "Tiny photos" and manifest.resolution == RESOLUTION
    assert [p.stem for p in manifest.pairs] == sorted(name for name, *_ in PHOTOS)
    assert manifest.masks["kind"] == "generated" and manifest.masks["setting"] == "random_medium_256"
    assert manifest.masks["seed"] == 3 and manifest.masks["config"]["irregular"]["max_width"] == 50
    assert 0 < manifest.mean_hole_ratio < 1 and "random_medium_256, seed 3" in manifest.mask_summary()
    for pair in manifest.pairs:
        image, mask = Image.open(pair.image_path(bench)), Image.open(pair.mask_path(bench))
        assert image.mode == "RGB" and image.size == (RESOLUTION, RESOLUTION)
        assert mask.mode == "L" and mask.size == (RESOLUTION, RESOLUTION)
        assert set(np.unique(np.asarray(mask))) == {0, 255}
        assert pathlib.Path(pair.source).parent == photos and pair.mask_source is None
    # 160x128 -> its central 128x128, pixels kept; 256x256 -> bicubic down to 128.
    beach = Image.open(photos / "beach.jpg").convert("RGB")
    np.testing.assert_array_equal(np.asarray(Image.open(bench / "images" / "beach.png")),
                                  np.asarray(beach)[:, 16:144])
    field = Image.open(photos / "field.png")
    np.testing.assert_array_equal(np.asarray(Image.open(bench / "images" / "field.png")),
                                  np.asarray(crop_and_resize(field, RESOLUTION, Image.Resampling.BICUBIC)))


def test_benchmark_is_deterministic(bench, photos, tmp_path):
    assert _build("--images", str(photos), "--mask-setting", "random_medium_256", "--seed", "3",
                  "--name", "Tiny photos", "--out", str(tmp_path / "again"), "--workers", "1") == 0
    assert _files(tmp_path / "again") == _files(bench)
    assert _build("--images", str(photos), "--mask-setting", "random_medium_256", "--seed", "4",
                  "--name", "Tiny photos", "--out", str(tmp_path / "seed4")) == 0
    other = _files(tmp_path / "seed4")
    assert all(other[k] == v for k, v in _files(bench).items() if k.startswith("images/"))
    assert all(other[k] != v for k, v in _files(bench).items() if k.startswith("masks/"))
    # --limit keeps a prefix: the same first pairs, byte for byte.
    assert _build("--images", str(photos), "--mask-setting", "random_medium_256", "--seed", "3",
                  "--name", "Tiny photos", "--out", str(tmp_path / "head"), "--limit", "2") == 0
    head = _files(tmp_path / "head")
    assert len(head) == 5 and all(head[k] == _files(bench)[k] for k in head if k != "manifest.json")


def test_user_masks(photos, tmp_path, capsys):
    """MAT-style masks (black holes, 256 px, their own names) paired by sorted order; by stem
    a missing mask is named."""
    masks = tmp_path / "mat_masks"
    masks.mkdir()
    for i in range(len(PHOTOS)):
        m = Image.new("L", (256, 256), 255)
        ImageDraw.Draw(m).rectangle((20 * i, 40, 20 * i + 99, 139), fill=0)
        m.save(masks / f"mask{i:03d}.png")
    out = tmp_path / "user"
    assert _build("--images", str(photos), "--mask-dir", str(masks), "--mask-hole", "black", "--out", str(out)) == 0
    manifest = read_manifest(out)
    assert manifest.masks == {"kind": "user", "dir": str(masks), "pair_by": "order", "hole": "black"}
    assert [pathlib.Path(p.mask_source).name for p in manifest.pairs] == [f"mask{i:03d}.png" for i in range(5)]
    hole = np.asarray(Image.open(manifest.pairs[1].mask_path(out))) == 255
    expected = np.zeros((RESOLUTION, RESOLUTION), bool)
    expected[20:70, 10:60] = True  # the 256-px box (20..119, 40..139) at half size
    np.testing.assert_array_equal(hole, expected)
    assert manifest.mean_hole_ratio == pytest.approx(50 * 50 / RESOLUTION**2)

    assert _build("--images", str(photos), "--mask-dir", str(masks), "--pair-by", "stem",
                  "--out", str(tmp_path / "wrong_stems")) == 1
    assert "no mask for 5 image stem(s): beach, door" in capsys.readouterr().err
    named = tmp_path / "named_masks"
    named.mkdir()
    for name, *_ in PHOTOS:  # white holes, named after the images
        Image.fromarray(255 - np.asarray(Image.open(masks / "mask002.png"))).save(named / f"{name}.png")
    assert _build("--images", str(photos), "--mask-dir", str(named), "--pair-by", "stem",
                  "--out", str(tmp_path / "by_stem")) == 0
    manifest = read_manifest(tmp_path / "by_stem")
    assert [pathlib.Path(p.mask_source).name for p in manifest.pairs] == [f"{p.stem}.png" for p in manifest.pairs]
    assert manifest.mean_hole_ratio == pytest.approx(50 * 50 / RESOLUTION**2)
    (masks / "mask000.png").unlink()
    assert _build("--images", str(photos), "--mask-dir", str(masks), "--out", str(tmp_path / "short")) == 1
    assert "4 masks for 5 images" in capsys.readouterr().err


def test_make_benchmark_refusals(bench, photos, monkeypatch, capsys):
    assert _build("--images", str(photos), "--mask-setting", "random_medium_256", "--out", str(bench)) == 1
    assert "already holds a benchmark" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'moebius-jax\[data\]'"):
        make_benchmark.tfds_listing("places365_small", "validation", None, None, "image")


def test_manifest_errors_name_the_file(bench, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    data = json.loads((bench / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{copy / 'manifest.json'}: 10 listed file"):
        read_manifest(copy)
    data["count"] = 4
    with pytest.raises(ValueError, match="count 4 but 5 pairs"):
        Manifest.from_json(data, "x.json")
    with pytest.raises(ValueError, match="not a .* benchmark folder"):
        read_manifest(tmp_path)


# -- run -------------------------------------------------------------------------------------


def test_run_resumes_without_recomputing(resumed, loaded_pipelines):
    pred, first = resumed["out"] / "pred", resumed["first"]
    stems = resumed["stems"]
    assert first["files"] == [f"{s}.png" for s in stems[:2]]
    assert sorted(p.name for p in pred.glob("*.png")) == [f"{s}.png" for s in stems]
    kept = pred / f"{stems[0]}.png"
    assert (kept.stat().st_mtime_ns, kept.stat().st_ino, kept.read_bytes()) == first["kept"]  # never rewritten
    # The broken one is made again with the same noise (seed and position only): equal up to
    # the float rounding of a batch-1 program instead of batch 2 (other noise would change the
    # whole hole). first["broken"] is the complete file as run 1 wrote it.
    redone = np.asarray(Image.open(pred / f"{stems[1]}.png"), np.int16)
    before = np.asarray(Image.open(io.BytesIO(first["broken"])), np.int16)
    assert np.abs(redone - before).max() <= 1 and np.mean(redone != before) < 0.001
    inference = resumed["metrics"]["inference"]
    assert inference["reused_predictions"] == 1 and inference["new_predictions"] == 4
    assert len(set(loaded_pipelines)) == 1  # both runs asked for the same pipeline


def test_run_metrics_and_table(resumed, bench):
    record = resumed["metrics"]
    assert record["method"] == "Moebius (moebius-jax)" and record["count"] == 5 and record["skipped"] == {}
    assert record["benchmark"] == score.manifest_info(read_manifest(bench))
    assert record["benchmark"]["resolution"] == "128x128" and record["benchmark"]["size"] == 5
    assert set(record["metrics"]) == {"fid", "lpips", "psnr", "ssim", "ssim_gaussian"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in record["metrics"].values())
    assert 0 < record["metrics"]["lpips"] < 1 and 0 < record["metrics"]["ssim"] < 1
    assert set(record["conventions"]) == {"fid", "lpips", "psnr_ssim"} and "ddof=1" in record["conventions"]["fid"]
    assert {"steps": 2, "batch_size": 2, "model_resolution": RESOLUTION}.items() <= record["inference"].items()
    # PSNR is the mean of the per-image values of the files on disk.
    pred, stems = resumed["out"] / "pred", resumed["stems"]
    psnrs = [image_metrics.psnr(np.asarray(Image.open(pred / f"{s}.png")),
                                np.asarray(Image.open(bench / "images" / f"{s}.png"))) for s in stems]
    assert record["metrics"]["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-12)
    table = resumed["table"].splitlines()
    assert table[0].startswith("**Tiny photos**: 128x128, 5 images, masks: random_medium_256, seed 3")
    assert "pytorch-fid" in table[0]
    assert table[2] == "| Method | FID↓ | LPIPS↓ | PSNR↑ | SSIM↑ | SSIM (Gaussian)↑ |"
    m = record["metrics"]
    assert table[4] == (f"| Moebius (moebius-jax) | {m['fid']:.2f} | {m['lpips']:.3f} | {m['psnr']:.2f} | "
                        f"{m['ssim']:.4f} | {m['ssim_gaussian']:.4f} |")


def test_run_without_metric_weights_says_what_it_skipped(resumed):
    first = resumed["first"]
    assert first["metrics"]["count"] == 2 and first["metrics"]["metrics"]["fid"] is None
    assert first["metrics"]["metrics"]["lpips"] is None and first["metrics"]["metrics"]["psnr"] > 0
    assert "--fid-weights" in first["metrics"]["skipped"]["fid"]
    assert "alexnet-owt-7be5be79.pth" in first["metrics"]["skipped"]["lpips"]
    assert "2 images (the first 2 of 5)" in first["table"]
    assert "| – | – |" in first["table"] and "- FID not computed: no --fid-weights given" in first["table"]


def test_run_refuses_other_settings(resumed, bench, capsys):
    out = resumed["out"]
    before = _files(out / "pred")
    args = [*TINY, "--benchmark", str(bench), "--out", str(out)]
    assert run.main([*args[:args.index("--steps") + 1], "3", *args[args.index("--steps") + 2:]]) == 1
    assert "other settings (steps: 2 -> 3)" in capsys.readouterr().err
    assert _files(out / "pred") == before


# -- score -----------------------------------------------------------------------------------


def test_score_matches_run(resumed, bench, metric_weights, tmp_path, capsys):
    out = tmp_path / "scored"
    assert score.main(["--pred", str(resumed["out"] / "pred"), "--gt", str(bench), "--out", str(out),
                       "--fid-weights", metric_weights["fid"], "--lpips-backbone", metric_weights["lpips"],
                       "--name", "Moebius (moebius-jax)"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    ran = resumed["metrics"]
    assert record["metrics"] == ran["metrics"]  # same files, same code, same batches: the same numbers
    assert record["benchmark"] == ran["benchmark"] and record["skipped"] == {} and "inference" not in record
    assert (out / "metrics.md").read_text() in capsys.readouterr().out


def test_score_plain_folders_and_missing_predictions(resumed, bench, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in sorted((resumed["out"] / "pred").glob("*.png"))[1:]:
        os.link(p, pred / p.name)
    assert score.main(["--pred", str(pred), "--gt", str(bench)]) == 1
    assert f"no prediction for 1 of 5 ground-truth images ({resumed['stems'][0]})" in capsys.readouterr().err
    # A plain ground-truth folder: pairs by stem, captions with what it can see.
    gt = tmp_path / "gt"
    gt.mkdir()
    for s in resumed["stems"][1:]:
        os.link(bench / "images" / f"{s}.png", gt / f"{s}.png")
    assert score.main(["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "m")]) == 0
    record = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert record["count"] == 4 and record["benchmark"]["resolution"] == "128x128"
    assert record["benchmark"]["masks"] == "not recorded"
