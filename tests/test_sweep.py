"""The sweep runner: identical seeds give identical curves, a changed mixer gives another one,
the JSONL and the PNG are written, a re-run resumes, and bad sweep files are refused."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import MICRO_TRAIN, ROOT

from moebius_jax.inspect_model import count_parameters
from moebius_jax.sweep import load_sweep, main, run_sweep, variant_configs

# The micro student, quick settings (conftest.MICRO_TRAIN: the reference variant's train step is
# test_train's), one log per step.
OVERRIDES = [*MICRO_TRAIN, "save_every=2"]
ATTENTION = ["model.levels.0.self_mixer=attention"]


def _write(tmp_path, variants, **extra):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": str(ROOT / "configs" / "train_demo.yaml"), "overrides": OVERRIDES,
                                    "steps": 3, "out": str(tmp_path / "out"), "variants": variants, **extra}))
    return path


def _curves(records):
    curves = {}
    for r in records:
        if not r.get("summary"):
            curves.setdefault(r["variant"], []).append((r["step"], r["loss"]))
    return curves


# The sweep trains three variants (two distinct train steps to compile) and resumes one: about
# four minutes of CPU, so the tests that read it are marked slow.
@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    path = _write(tmp_path, {"reference": {}, "same_again": {}, "attention": {"overrides": ATTENTION}})
    records = run_sweep(load_sweep(path))
    return tmp_path, path, records


@pytest.mark.slow
def test_identical_seeds_give_identical_curves(swept):
    _, _, records = swept
    curves = _curves(records)
    assert [s for s, _ in curves["reference"]] == [1, 2, 3]
    assert curves["same_again"] == curves["reference"]
    assert curves["attention"] != curves["reference"]


@pytest.mark.slow
def test_jsonl_png_and_summaries(swept):
    tmp_path, _, records = swept
    out = tmp_path / "out"
    lines = (out / "sweep.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summaries = {r["variant"]: r for r in records if r.get("summary")}
    assert set(summaries) == {"reference", "same_again", "attention"}
    for name, s in summaries.items():
        model = yaml.safe_load((out / name / "config.yaml").read_text())["model"]  # the model itself
        assert s["params"] == count_parameters(model)
        assert s["steps"] == 3 and s["step_ms"] > 0 and s["compile_s"] > 0
        losses = [loss for _, loss in _curves(records)[name]]
        assert s["final_loss"] == pytest.approx(sum(losses) / len(losses))
    assert summaries["attention"]["params"] != summaries["reference"]["params"]


@pytest.mark.slow
def test_a_rerun_skips_finished_variants_and_extends_the_others(swept, capsys):
    tmp_path, path, records = swept
    before = (tmp_path / "out" / "attention" / "metrics.jsonl").read_text()
    # Same steps: nothing trains, the records are the same.
    assert run_sweep(load_sweep(path), make_plot=False) == records
    assert (tmp_path / "out" / "attention" / "metrics.jsonl").read_text() == before
    # One step more (for one variant, to keep the test short): it resumes from its step-3
    # checkpoint and the log has no duplicate.
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "variants": {"reference": {}}}))
    assert main([str(one), "--steps", "4", "--no-plot"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(s["variant"], s["steps"]) for s in printed] == [("reference", 4)]
    curves = _curves([json.loads(line) for line in (tmp_path / "out" / "sweep.jsonl").read_text().splitlines()])
    assert [s for s, _ in curves["reference"]] == [1, 2, 3, 4]
    assert curves["reference"][:3] == _curves(records)["reference"]


@pytest.mark.parametrize("variants, match", [
    ({"bad": {"overrides": ["data.batch_size=8"]}}, "every variant shares"),
    ({"bad": {"overrides": ["seed=1"]}}, "every variant shares"),
    ({"bad": {"overrides": ["model.levels.0.self_mixer=convolution"]}}, r"variant 'bad'.*self_mixer='convolution'"),
    ({"bad": {"model": {"levels": {0: {"self_mixer": "attention"}}}}}, "expected a mapping with `overrides`"),
    ({"a/b": {}}, "names a folder"),
])
def test_bad_sweeps_are_refused(tmp_path, variants, match):
    with pytest.raises(ValueError, match=match):
        variant_configs(load_sweep(_write(tmp_path, variants)))


def test_the_shipped_sweep_is_valid(monkeypatch):
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository, like train.py's configs
    configs = variant_configs(load_sweep("configs/sweeps/mixers_tiny.yaml"))
    assert len(configs) == 8 and "local_lambda" in configs
