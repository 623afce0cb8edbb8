"""The trainer: learning, exact resume, export, the CLI contract (the mesh: test_mesh.py)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
import yaml
from conftest import FAST_TRAIN, MICRO_STUDENT_CONFIG, MICRO_TRAIN, ROOT, fixture_path

import train
from moebius_jax.convert.state_dict import read_state_dict, read_ema_file
from moebius_jax.config import load_config
from moebius_jax.train import export
from moebius_jax.train.config import config_to_dict, load_train_config
from moebius_jax.train.export import export_state
from moebius_jax.train.loop import Trainer


def _config(*overrides):
    """The demo training config (the tiny student) with quick settings (conftest.FAST_TRAIN)."""
    return load_train_config(ROOT / "configs" / "train_demo.yaml", [*FAST_TRAIN, *overrides])


def _micro_config(*overrides):
    """For runs that train: the micro student, quick settings (conftest.MICRO_TRAIN; the
    overfitting test keeps the reference's Muon)."""
    return load_train_config(ROOT / "configs" / "train_demo.yaml", [*MICRO_TRAIN, *overrides])


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow  # 200 Muon steps: about 3 minutes of CPU
def test_overfitting_one_batch_halves_the_task_loss():
    trainer = Trainer.build(_micro_config("optimizer.name=muon", "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=10",
                                    "optimizer.total_steps=200"), "/nonexistent")
    batch = trainer._to_global(next(trainer._data_iterator()))
    state, losses = trainer.state, []
    for _ in range(200):
        state, metrics = trainer.step_fn(state, trainer.frozen, batch)
        losses.append(float(metrics["loss_task"]))
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last <= 0.5 * first, (first, last)


def test_resume_continues_bit_identically(tmp_path):
    config = _micro_config("save_every=3")
    Trainer.build(config, tmp_path / "straight").run(max_steps=6)
    first_half = Trainer.build(config, tmp_path / "split")
    first_half.run(max_steps=3)
    # Training into a workdir with checkpoints, without resume, is refused (nothing overwritten).
    with pytest.raises(FileExistsError, match="--resume"):
        first_half.run(max_steps=6)
    assert sorted(_losses(tmp_path / "split")) == [1, 2, 3]
    # A checkpoint torn mid-write must be ignored: orbax only renames complete ones.
    torn = tmp_path / "split" / "checkpoints" / "5.orbax-checkpoint-tmp-1234"
    torn.mkdir()
    (torn / "junk").write_text("half written")
    Trainer.build(config, tmp_path / "split").run(resume=True, max_steps=6)
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert split[step] == straight[step], step


@pytest.mark.slow  # compiles the student, the teacher and E-LatentLPIPS in one step: about 6 minutes of CPU
def test_four_term_distillation_logs_every_weight(tmp_path):
    """Task + output KD + feature KD + E-LatentLPIPS (random weights by the fixture rule)."""
    from elatentlpips_weights import full_width_entries, regenerate, write_tuned_file

    tuned = write_tuned_file(tmp_path / "sdxl_latest_vgg16_tuned.pth", regenerate(full_width_entries()))
    config = load_train_config(ROOT / "configs" / "distill_demo.yaml",  # the tiny student: its features fit the teacher's
                               [*FAST_TRAIN, "loss.elatentlpips.weight=0.5", f"loss.elatentlpips.heads={tuned}"])
    Trainer.build(config, tmp_path / "run").run(max_steps=2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "loss_task", "loss_outkd", "loss_featkd", "loss_extra", "weight_feat_task",
                 "weight_out_outkd", "weight_out_extra", "gnorm_feature_task", "gnorm_output_extra"):
        assert all(np.isfinite(r[name]) for r in records), name
    r = records[-1]
    expected = 0.01 * r["loss_featkd"] + r["weight_feat_task"] * (
        0.5 * r["loss_task"] + 0.01 * r["weight_out_outkd"] * r["loss_outkd"]
        + 0.5 * r["weight_out_extra"] * r["loss_extra"])
    np.testing.assert_allclose(r["loss"], expected, rtol=1e-5)


def test_export_reproduces_the_reference_files(tmp_path, tiny_student):
    weights = fixture_path("moebius_tiny", "diffusion_pytorch_model.bin")
    _, variables = tiny_student
    ema = {"shadow": variables["params"], "decay": np.float32(0.9999), "num_updates": np.int32(0)}
    written = export_state({**jax.device_get(variables), "ema": jax.device_get(ema)}, tmp_path)
    exported, original = read_state_dict(written[0]), read_state_dict(weights)
    assert list(exported) == list(original) or set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    ema_file = read_ema_file(written[1])
    assert ema_file.decay == float(np.float32(0.9999)) and ema_file.num_updates == 0
    for key, value in ema_file.params.items():
        np.testing.assert_array_equal(value, original[key])


def test_train_py_cli_with_a_jsonl_dataset(tmp_path, monkeypatch):
    """train.py and the export command, called in-process (a subprocess would import JAX and
    compile the step again)."""
    data = tmp_path / "data"
    data.mkdir()
    demo = ROOT / "data" / "demo"
    photos = sorted(demo.glob("*.jpg"))[:3]
    lines = [json.dumps({"image": str(p), "prompt": "background"}) for p in photos]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "run"
    monkeypatch.chdir(ROOT)  # the demo config's paths are relative to the repository, as train.py expects
    assert train.main(["--config", "configs/train_demo.yaml", "--workdir", str(workdir), "--max-steps", "2",
                       "--data-jsonl", str(data / "train.jsonl"), *MICRO_TRAIN, "save_every=2"]) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert (workdir / "checkpoints" / "2").is_dir()
    written = yaml.safe_load((workdir / "config.yaml").read_text())  # the model's content, not its path
    assert written["model"] == yaml.safe_load(MICRO_STUDENT_CONFIG.read_text())
    assert any((workdir / "tensorboard").iterdir())
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "diffusion_pytorch_model.safetensors").exists()


def test_model_fields_are_overridden_like_any_other(tmp_path):
    config = _config("model.levels.1.self_mixer=attention", "model.layers_per_block=1", "model.data.image_size=64",
                     "model.levels.1.mixer_options.attention={}",
                     "model.levels.2.mixer_options.local_lambda.kernel_size=7")
    raw = yaml.safe_load((ROOT / "configs" / "moebius_tiny.yaml").read_text())
    assert config.model["vae"] == raw["vae"] and config.model["data"] == {"image_size": 64}
    assert config.model["model"] == {**raw["model"], "layers_per_block": 1, "levels": {
        1: {"self_mixer": "attention", "mixer_options": {"attention": {}}},
        2: {"mixer_options": {"local_lambda": {"kernel_size": 7}}}}}
    unet = load_config(config.model).unet
    assert [lv.self_mixer for lv in unet.levels] == ["local_lambda", "attention", "local_lambda"]
    assert (unet.layers_per_block, unet.sample_size) == (1, 8)
    assert unet.levels[2].mixer_options == {"local_lambda": {"kernel_size": 7}}
    # A list given whole, then indexed; the model given as a path, then as the content the run wrote.
    config = _config("model.levels=[{}, {channels: 96}, {}]", "model.levels.1.self_mixer=gla")
    assert config.model["model"]["levels"] == [{}, {"channels": 96, "self_mixer": "gla"}, {}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))  # as a run writes it
    assert load_train_config(tmp_path / "config.yaml") == config
    plain = _config()
    assert plain.model == "configs/moebius_tiny.yaml"  # untouched unless a model key is overridden
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(plain)))["model"] == raw


@pytest.mark.parametrize("override, message", [
    ("model.levels.3.self_mixer=attention", r"model: levels: no level 3 \(the network has levels 0..2\)"),
    ("model.levels.0.self_mixer=conv", r"model: level 0 self_mixer='conv': not one of \('local_lambda'"),
    ("model.levels.0.mixer_options.gla.expand_k=1", r"model: level 0 mixer_options.gla: this level uses no 'gla'"),
    ("model=3", r"model: expected str or dict, got 3"),
    ("optimizer.learning_rate.x=1", r"override optimizer.learning_rate.x: 'learning_rate' holds 0.001, not a section"),
])
def test_bad_model_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        _config(override)
    with pytest.raises(ValueError, match=r"override model.levels.3.channels: 3 is not an index of a list of 3"):
        _config("model.levels=[{}, {}, {}]", "model.levels.3.channels=64")


def test_bad_overrides_are_named():
    with pytest.raises(ValueError, match="optimizer.learning_rate"):
        _config("optimizer.learning_rate=fast")
    with pytest.raises(ValueError, match="unknown key"):
        _config("data.colour=blue")
