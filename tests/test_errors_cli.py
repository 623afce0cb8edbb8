"""Bad input at every entry point: refused up front, by name, without a traceback, nothing lost.

One test (or more) per cause: tracebacks instead of messages, impossible values accepted,
config errors that do not name their field, files dropped in folder mode, a user's file
overwritten. Each checks the exit status, that the message names the culprit, that stderr
holds no traceback, that the inputs are byte-identical afterwards and that no output was
left behind. Commands run in-process (`main(argv)`); a few subprocesses prove the same end
to end. Nothing here loads or compiles a model: validation must refuse before that.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import ROOT, fixture_path
from PIL import Image

import infer
import train
from moebius_jax import cli
from moebius_jax.config import load_config
from moebius_jax.convert.__main__ import main as convert_main
from moebius_jax.errors import ConfigError, UserError, field_line, read_yaml
from moebius_jax.eval import run as eval_run
from moebius_jax.eval import score as eval_score
from moebius_jax.inspect_model import main as inspect_main
from moebius_jax.io_safety import atomic_output, prepare_output_dir
from moebius_jax.train import export as train_export
from moebius_jax.train import loop
from moebius_jax.transplant import main as transplant_main

WEIGHTS = fixture_path("moebius_tiny", "diffusion_pytorch_model.bin")
VAE = fixture_path("vae_tiny")
CONFIG = fixture_path("moebius_tiny", "config.yaml")
MODEL = ["--weights", str(WEIGHTS), "--vae", str(VAE)]
TRAIN_FAST = ["data.image_size=64", "data.batch_size=2", "data.num_workers=0", "dtype=float32",
              "optimizer.name=adamw"]


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of an in-process command; argparse's own exit counts as a status."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def _refused(status: int, err: str, *names: str) -> None:
    assert status not in (0, None), err
    assert "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture
def no_model(monkeypatch):
    """Make any model load fail loudly: a refusal must come before it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(infer, "load_pipeline", forbidden)
    monkeypatch.setattr(eval_run.InpaintPipeline, "from_pretrained", forbidden)
    monkeypatch.setattr(loop, "make_train_program", forbidden)
    monkeypatch.setattr(loop, "init_state", forbidden)
    monkeypatch.setattr(eval_score, "score_pairs", forbidden)


def _image(path: pathlib.Path, size=(96, 80), mode="RGB") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture
def pair(tmp_path):
    return _image(tmp_path / "in" / "photo.png"), _image(tmp_path / "in" / "mask.png", mode="L")


# -- cause 1: a message instead of a traceback, before the model loads -------------------------


def test_infer_missing_folder_is_named(tmp_path, no_model, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    status, err = _run(infer.main, [*MODEL, "--image-dir", str(tmp_path / "nowhere"), "--mask-dir", str(masks),
                                    "--out-dir", str(tmp_path / "out")], capsys)
    _refused(status, err, "--image-dir", "nowhere", "no such folder")
    assert not (tmp_path / "out").exists()


def test_infer_output_that_is_a_folder_or_a_file_in_the_way(tmp_path, pair, no_model, capsys):
    before = _snapshot(tmp_path)
    folder = tmp_path / "result.png"
    folder.mkdir()
    status, err = _run(infer.main, [*MODEL, "--image", str(pair[0]), "--mask", str(pair[1]), "--out", str(folder)],
                       capsys)
    _refused(status, err, "--out", "result.png", "is a folder")
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    status, err = _run(infer.main, [*MODEL, "--image-dir", str(pair[0].parent), "--mask-dir", str(pair[0].parent),
                                    "--out-dir", str(blocker)], capsys)
    _refused(status, err, "--out-dir", "results", "a file, not a folder")
    status, err = _run(infer.main, [*MODEL, "--image", str(pair[0]), "--mask", str(pair[1]),
                                    "--out", str(blocker / "x.png")], capsys)
    _refused(status, err, "results", "is a file, not a folder")
    assert _snapshot(tmp_path) == {**before, "results": b"not a folder"}


def test_infer_unknown_output_suffix_is_refused_before_inference(tmp_path, pair, no_model, capsys):
    for name in ("result.xyz", "result"):
        status, err = _run(infer.main, [*MODEL, "--image", str(pair[0]), "--mask", str(pair[1]),
                                        "--out", str(tmp_path / name)], capsys)
        _refused(status, err, "--out", name, "cannot write an RGB image")
        assert not (tmp_path / name).exists()


def test_infer_missing_input_file_is_named(tmp_path, pair, no_model, capsys):
    status, err = _run(infer.main, [*MODEL, "--image", str(tmp_path / "gone.jpg"), "--mask", str(pair[1]),
                                    "--out", str(tmp_path / "r.png")], capsys)
    _refused(status, err, "--image", "gone.jpg", "no such file")


def test_infer_invalid_config_yaml_names_file_and_line(tmp_path, pair, no_model, capsys):
    config = tmp_path / "model.yaml"
    config.write_text("data:\n  image_size: 64\nmodel:\n  block_out_channels: [32, 64\n  layers_per_block: 1\n")
    before = config.read_bytes()
    status, err = _run(infer.main, [*MODEL, "--config", str(config), "--image", str(pair[0]), "--mask", str(pair[1]),
                                    "--out", str(tmp_path / "r.png")], capsys)
    _refused(status, err, f"{config}:5:", "invalid YAML", "block_out_channels")
    assert config.read_bytes() == before and not (tmp_path / "r.png").exists()


def test_score_out_that_is_a_file_is_refused_before_scoring(tmp_path, no_model, capsys):
    pred, gt = _image(tmp_path / "pred" / "a.png").parent, _image(tmp_path / "gt" / "a.png").parent
    out = tmp_path / "metrics"
    out.write_text("mine")
    status, err = _run(eval_score.main, ["--pred", str(pred), "--gt", str(gt), "--out", str(out)], capsys)
    _refused(status, err, "--out", str(out), "is a file")
    assert out.read_text() == "mine"


def _jsonl(tmp_path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _record(image: pathlib.Path) -> str:
    return json.dumps({"image": str(image), "prompt": "background"})


@pytest.mark.parametrize("case", ["not_json", "missing_image", "corrupt_image", "empty"])
def test_train_data_errors_come_before_any_model_or_trace(tmp_path, no_model, capsys, case):
    good = _image(tmp_path / "data" / "good.png")
    corrupt = tmp_path / "data" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    lines, names = {
        "not_json": ([_record(good), "{'image': 'good.png', 'prompt': 'background'}"], ["train.jsonl:2", "not valid JSON"]),
        "missing_image": ([_record(good), _record(tmp_path / "data" / "gone.png")], ["train.jsonl:2", "gone.png"]),
        "corrupt_image": ([_record(corrupt), _record(good)], ["train.jsonl:1", "corrupt.png", "cannot be read"]),
        "empty": (["", "   "], ["train.jsonl", "no training items"]),
    }[case]
    data = _jsonl(tmp_path, lines)
    before = _snapshot(tmp_path)
    status, err = _run(train.main, ["--config", str(ROOT / "configs" / "train_demo.yaml"),
                                    "--workdir", str(tmp_path / "run"), "--data-jsonl", str(data), *TRAIN_FAST],
                       capsys)
    _refused(status, err, *names)  # no_model: neither a model loaded nor a train step was traced
    assert _snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_train_config_yaml_errors_carry_file_line_and_field(tmp_path, no_model, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("model: configs/moebius_tiny.yaml\ndata:\n  batch_size: 2\n  image_size: [64\n")
    status, err = _run(train.main, ["--config", str(config), "--workdir", str(tmp_path / "run")], capsys)
    _refused(status, err, f"{config}:", "invalid YAML", "image_size")
    config.write_text("data:\n  batch_size: two\n")
    status, err = _run(train.main, ["--config", str(config), "--workdir", str(tmp_path / "run")], capsys)
    _refused(status, err, str(config), "data.batch_size", "'two'")
    status, err = _run(train.main, ["--config", str(config), "--workdir", str(tmp_path / "run"), "seed=[1"], capsys)
    _refused(status, err, "seed=[1", "not a valid YAML value")
    assert not (tmp_path / "run").exists()


# -- cause 2: impossible values refused at parse time -----------------------------------------


@pytest.mark.parametrize("flag, value, says", [
    ("--cfg", "nan", "finite"), ("--cfg", "inf", "finite"), ("--strength", "1.5", "<= 1"),
    ("--strength", "0", "> 0"), ("--resolution", "0", ">= 64"), ("--resolution", "32", ">= 64"),
    ("--steps", "0", ">= 1"), ("--steps", "-1", ">= 1"), ("--batch-size", "0", ">= 1"),
    ("--crop-margin", "-0.5", ">= 0"), ("--noise-offset", "nan", "finite"), ("--steps", "two", "an integer"),
])
def test_infer_impossible_values(tmp_path, pair, no_model, capsys, flag, value, says):
    status, err = _run(infer.main, [*MODEL, "--image", str(pair[0]), "--mask", str(pair[1]),
                                    "--out", str(tmp_path / "r.png"), flag, value], capsys)
    assert status == 2  # argparse's own error: usage and the argument
    _refused(status, err, f"argument {flag}", says)


@pytest.mark.parametrize("main, argv", [
    (eval_run.main, ["--weights", "w", "--vae", "v", "--benchmark", "b", "--out", "o", "--cfg", "nan"]),
    (eval_run.main, ["--weights", "w", "--vae", "v", "--benchmark", "b", "--out", "o", "--model-resolution", "8"]),
    (eval_score.main, ["--pred", "p", "--gt", "g", "--workers", "0"]),
    (train.main, ["--config", "c", "--workdir", "w", "--max-steps", "0"]),
    (inspect_main, ["c", "--batch", "0"]),
    (inspect_main, ["c", "--resolution", "64x"]),
    (train_export.main, ["--workdir", "w", "--out", "o", "--step", "-3"]),
])
def test_other_commands_range_check_their_arguments(capsys, main, argv):
    status, err = _run(main, argv, capsys)
    assert status == 2
    _refused(status, err, "argument")


# -- cause 3: config errors name file, line, field and value ----------------------------------


def test_wrong_typed_list_entry_names_field_value_and_line(tmp_path, capsys):
    raw = read_yaml(CONFIG)
    raw["model"]["block_out_channels"][1] = "64"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = field_line(bad, ("model", "block_out_channels", 1))
    assert bad.read_text().splitlines()[line - 1].strip() == "- '64'"
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert str(caught.value) == f"{bad}:{line}: model.block_out_channels[1]: expected an integer, got '64'"
    status, err = _run(convert_main, ["--config", str(bad), "--weights", str(WEIGHTS), "--out", str(tmp_path / "c")],
                       capsys)
    _refused(status, err, "model.block_out_channels[1]", "'64'", str(bad))
    assert not (tmp_path / "c").exists()


def test_inspect_reports_a_wrong_typed_section_as_invalid(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("model:\n", "model: 3\nunused:\n", 1))
    status, err = _run(inspect_main, [str(bad), "--no-flops"], capsys)
    _refused(status, err, "invalid:", f"{bad}:", "model: expected a mapping, got 3")


# -- cause 4: folder mode never drops or collides ---------------------------------------------


def test_infer_folder_refuses_ambiguous_stems(tmp_path, no_model, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _image(images / "cat.jpg"), _image(images / "cat.png"), _image(images / "dog.png")
    _image(masks / "cat.png", mode="L"), _image(masks / "dog.png", mode="L")
    before = _snapshot(tmp_path)
    status, err = _run(infer.main, [*MODEL, "--image-dir", str(images), "--mask-dir", str(masks),
                                    "--out-dir", str(tmp_path / "out")], capsys)
    _refused(status, err, "--image-dir", "cat.jpg, cat.png")
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    # Two masks for one image are just as ambiguous.
    (images / "cat.jpg").unlink()
    _image(masks / "cat.webp", mode="L")
    status, err = _run(infer.main, [*MODEL, "--image-dir", str(images), "--mask-dir", str(masks),
                                    "--out-dir", str(tmp_path / "out")], capsys)
    _refused(status, err, "--mask-dir", "cat.png, cat.webp")


def test_infer_folder_output_onto_an_input_is_refused(tmp_path, no_model, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    _image(images / "a.png"), _image(masks / "a.png", mode="L")
    before = _snapshot(tmp_path)
    status, err = _run(infer.main, [*MODEL, "--image-dir", str(images), "--mask-dir", str(masks),
                                    "--out-dir", str(masks)], capsys)
    _refused(status, err, str(masks / "a.png"), "is also an input")
    assert _snapshot(tmp_path) == before


# -- cause 5: nothing the user did not ask to overwrite ---------------------------------------


def test_convert_into_a_folder_holding_the_users_config(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own notes\n")
    before = _snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        status, err = _run(convert_main, ["--config", str(CONFIG), "--weights", str(WEIGHTS), "--out", str(out),
                                          *extra], capsys)
        _refused(status, err, str(out), "config.yaml", "holds no earlier output")
    assert _snapshot(tmp_path) == before


def test_convert_overwrite_never_replaces_an_input(tmp_path, capsys):
    out = tmp_path / "converted"
    (out / "variables").mkdir(parents=True)
    (out / "config.yaml").write_text(CONFIG.read_text())
    before = _snapshot(tmp_path)
    status, err = _run(convert_main, ["--config", str(out / "config.yaml"), "--weights", str(WEIGHTS),
                                      "--out", str(out), "--overwrite"], capsys)
    _refused(status, err, "config.yaml", "is where this command writes")
    status, err = _run(convert_main, ["--config", str(CONFIG), "--weights", str(WEIGHTS), "--out", str(out)], capsys)
    _refused(status, err, "holds an earlier output (variables)", "--overwrite")
    assert _snapshot(tmp_path) == before


def test_transplant_export_run_score_and_train_refuse_user_folders(tmp_path, no_model, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "metrics.md").write_text("my table")
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    pred, gt = _image(tmp_path / "pred" / "a.png").parent, _image(tmp_path / "gt" / "a.png").parent
    before = _snapshot(tmp_path)
    commands = [
        (transplant_main, [str(WEIGHTS), str(CONFIG), "--out", str(out)]),
        (train_export.main, ["--workdir", str(workdir), "--out", str(out)]),
        (eval_run.main, [*MODEL, "--benchmark", str(tmp_path / "bench"), "--out", str(out)]),
        (eval_score.main, ["--pred", str(pred), "--gt", str(gt), "--out", str(out)]),
        (train.main, ["--config", str(ROOT / "configs" / "train_demo.yaml"), "--workdir", str(out)]),
    ]
    for main, argv in commands:
        status, err = _run(main, argv, capsys)
        _refused(status, err, str(out), "notes.txt", "not empty")
    assert _snapshot(tmp_path) == before


def test_score_replaces_earlier_metrics_only_with_overwrite(tmp_path, no_model, capsys):
    out = tmp_path / "scored"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    pred, gt = _image(tmp_path / "pred" / "a.png").parent, _image(tmp_path / "gt" / "a.png").parent
    status, err = _run(eval_score.main, ["--pred", str(pred), "--gt", str(gt), "--out", str(out)], capsys)
    _refused(status, err, "holds an earlier output (metrics.json)", "--overwrite")
    # With --overwrite the folder passes the check and scoring starts (here: the forbidden stand-in).
    with pytest.raises(AssertionError, match="validated"):
        eval_score.main(["--pred", str(pred), "--gt", str(gt), "--out", str(out), "--overwrite"])


def test_export_refuses_a_folder_that_is_not_a_workdir_and_creates_nothing(tmp_path, capsys):
    status, err = _run(train_export.main, ["--workdir", str(tmp_path / "typo"), "--out", str(tmp_path / "e")], capsys)
    _refused(status, err, "typo", "not a train.py workdir")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_leaves_no_half_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("complete old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash mid-write")
    assert _snapshot(tmp_path) == {"result.json": b"complete old"}


def test_prepare_output_dir_rules(tmp_path):
    assert prepare_output_dir(tmp_path / "new" / "deeper", "--out", marker="m") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checks only, creates nothing
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "m").write_text("")
    prepare_output_dir(tmp_path / "earlier", "--out", marker="m", overwrite=True)
    with pytest.raises(UserError, match="pass --resume"):
        prepare_output_dir(tmp_path / "earlier", "--out", marker="m", flag="--resume")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_output_dir(blocker / "sub", "--out", marker="m")


# -- the boundary itself ----------------------------------------------------------------------


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, pair, no_model, monkeypatch, capsys):
    argv = [*MODEL, "--image", str(pair[0]), "--mask", str(pair[1]), "--out", str(tmp_path / "r.xyz")]
    with pytest.raises(UserError, match="cannot write"):
        infer.main([*argv, "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(UserError, match="cannot write"):
        infer.main(argv)
    monkeypatch.delenv(cli.DEBUG_ENV)

    def bug(*args, **kwargs):
        raise ValueError("an internal inconsistency")  # not a UserError: a bug, shown in full

    monkeypatch.setattr(infer, "plan_jobs", bug)
    with pytest.raises(ValueError, match="internal"):
        infer.main(argv)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_end_to_end_no_traceback(tmp_path, pair):
    """As a user sees it: one line, status 1, no traceback (infer, train, convert)."""
    out = _cli("infer.py", *MODEL, "--image", str(pair[0]), "--mask", str(pair[1]), "--out", str(tmp_path / "r.heic"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: --out {tmp_path / 'r.heic'}: cannot write")
    corrupt = tmp_path / "data" / "bad.jpg"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    data = _jsonl(tmp_path, [_record(corrupt)])
    out = _cli("train.py", "--config", "configs/train_demo.yaml", "--workdir", str(tmp_path / "run"),
               "--data-jsonl", str(data), *TRAIN_FAST)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "bad.jpg" in out.stderr and "compiled" not in out.stderr and not (tmp_path / "run").exists()
    out = _cli("-m", "moebius_jax.convert", "--config", str(CONFIG), "--weights", str(tmp_path / "none.bin"),
               "--out", str(tmp_path / "c"))
    assert out.returncode == 1 and "Traceback" not in out.stderr and "none.bin" in out.stderr
