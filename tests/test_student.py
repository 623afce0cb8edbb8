"""Parity of the Moebius student with the reference (moebius_tiny fixtures), and its loaders."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import assert_parity, fixture_path, load_npz, nchw_to_nhwc

import moebius_jax
from moebius_jax.convert.errors import CheckpointError, CheckpointMismatchError
from moebius_jax.convert.keymap import plan
from moebius_jax.convert.maps import UNET_KEYMAP
from moebius_jax.convert.orbax_io import save_variables
from moebius_jax.convert.state_dict import read_state_dict, write_safetensors
from moebius_jax.loading import abstract_variables, build_model, export_state_dict

CONFIG = fixture_path("moebius_tiny", "config.yaml")
WEIGHTS = fixture_path("moebius_tiny", "diffusion_pytorch_model.bin")
EMA_WEIGHTS = fixture_path("moebius_tiny", "diffusion_pytorch_model.EMA.bin")


@pytest.fixture(scope="module")
def io():
    return load_npz("moebius_tiny", "io.npz")


@pytest.fixture(scope="module")
def student(tiny_student):
    return tiny_student


@pytest.fixture(scope="module")
def forward(tiny_student_apply):
    return tiny_student_apply


@pytest.fixture(scope="module")
def eval_out(student, forward, io):
    _, variables = student
    return forward(variables, nchw_to_nhwc(io["sample"]), io["timesteps"], io["input_ids"])


def test_eval_output(eval_out, io):
    assert_parity(eval_out.sample, nchw_to_nhwc(io["out_sample"]), name="out_sample")


@pytest.mark.parametrize("index", range(6))
def test_eval_block_outputs(eval_out, io, index):
    assert len(eval_out.block_outputs) == 6
    assert_parity(eval_out.block_outputs[index], nchw_to_nhwc(io[f"block_{index}"]), name=f"block_{index}")


def test_single_timestep_broadcasts(student, forward, io):
    _, variables = student
    out = forward(variables, nchw_to_nhwc(io["sample"]), np.array([500]), io["input_ids"])
    assert_parity(out.sample, nchw_to_nhwc(io["out_sample_t1"]), name="out_sample_t1")
    scalar = forward(variables, nchw_to_nhwc(io["sample"]), np.int32(500), io["input_ids"])
    np.testing.assert_array_equal(np.asarray(scalar.sample), np.asarray(out.sample))


def test_ema_weights_take_batch_stats_from_the_plain_checkpoint(forward, io):
    _, variables = moebius_jax.load_model(CONFIG, EMA_WEIGHTS)
    out = forward(variables, nchw_to_nhwc(io["sample"]), io["timesteps"], io["input_ids"])
    assert_parity(out.sample, nchw_to_nhwc(io["out_sample_ema"]), name="out_sample_ema")


def test_ema_without_batch_stats_is_an_error(tmp_path):
    lonely = tmp_path / "diffusion_pytorch_model.EMA.bin"
    shutil.copy(EMA_WEIGHTS, lonely)
    with pytest.raises(CheckpointError, match="BatchNorm statistics"):
        moebius_jax.load_model(CONFIG, lonely)
    # An explicit source of statistics makes it loadable.
    _, variables = moebius_jax.load_model(CONFIG, lonely, batch_stats_from=WEIGHTS)
    assert "batch_stats" in variables


def test_train_mode_uses_batch_statistics_and_updates_them_like_torch(student, io):
    model, variables = student
    out, updates = jax.jit(
        lambda v, x, t, ids: model.apply(v, x, t, ids, train=True, mutable=["batch_stats"])
    )(variables, nchw_to_nhwc(io["sample"]), io["timesteps"], io["input_ids"])
    assert_parity(out.sample, nchw_to_nhwc(io["train_out_sample"]), name="train_out_sample")
    for i in range(6):
        assert_parity(out.block_outputs[i], nchw_to_nhwc(io[f"train_block_{i}"]), name=f"train_block_{i}")
    exported = export_state_dict({"params": variables["params"], **updates})
    for key in io["train_bn_keys"]:
        ref = io[f"train_bn_{key.replace('.', '__')}"]
        if key.endswith("num_batches_tracked"):
            assert exported[key] == ref == 1, key
        else:
            assert_parity(exported[key], ref, name=key)


def test_safetensors_and_orbax_give_bit_identical_variables(student, tmp_path):
    model, variables = student
    st = tmp_path / "model.safetensors"
    write_safetensors(st, read_state_dict(WEIGHTS))
    _, from_st = moebius_jax.load_model(CONFIG, st)
    jax.tree.map(np.testing.assert_array_equal, from_st, variables)

    save_variables(tmp_path / "orbax", variables)
    _, from_orbax = moebius_jax.load_model(CONFIG, tmp_path / "orbax")
    jax.tree.map(np.testing.assert_array_equal, from_orbax, variables)


def test_export_reproduces_the_reference_state_dict(student):
    _, variables = student
    original = read_state_dict(WEIGHTS)
    exported = export_state_dict(variables)
    assert list(exported) == list(original) or set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_mismatched_checkpoint_lists_every_bad_key(tmp_path):
    state = read_state_dict(WEIGHTS)
    del state["diff_model.conv_in.conv_pw.weight"]
    state["diff_model.conv_out.conv_pw.weight"] = np.zeros((5, 32, 1, 1), np.float32)
    state["diff_model.not_a_layer.weight"] = np.zeros((3,), np.float32)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, state)
    with pytest.raises(CheckpointMismatchError) as err:
        moebius_jax.load_model(CONFIG, bad)
    message = str(err.value)
    assert str(bad) in message
    assert "diff_model.conv_in.conv_pw.weight  expected (32, 9, 1, 1)" in message
    assert "diff_model.conv_out.conv_pw.weight  expected (4, 32, 1, 1), actual (5, 32, 1, 1)" in message
    assert "diff_model.not_a_layer.weight  actual (3,)" in message


def test_truncated_checkpoint_is_a_named_error(tmp_path):
    data = WEIGHTS.read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.bin"):
        moebius_jax.load_model(CONFIG, truncated)


@pytest.mark.parametrize(
    "config, manifest, params",
    [
        ("moebius_full_config.yaml", "moebius_full_manifest.json", 226_041_531),
        ("pixelhacker_full_config.yaml", "pixelhacker_full_manifest.json", 862_251_708),
    ],
)
def test_full_size_manifest_maps_exactly(config, manifest, params):
    """Every reference key lands on a Flax leaf of the right shape, nothing left over (no allocation)."""
    model, cfg = build_model(fixture_path(config))
    abstract = abstract_variables(model, cfg)
    entries = json.loads(fixture_path(manifest).read_text())["state_dict"]
    matched = plan({key: shape for key, shape, _ in entries}, UNET_KEYMAP, abstract, manifest)
    assert len(matched) == len(entries)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])) == params


def test_convert_cli_writes_a_directory_load_model_reads_back(student, tmp_path):
    from moebius_jax.convert.__main__ import main

    _, variables = student
    out = tmp_path / "converted"
    assert main(["--config", str(CONFIG), "--weights", str(WEIGHTS), "--out", str(out)]) == 0
    _, restored = moebius_jax.load_model(out / "config.yaml", out)
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    assert main(["--config", str(CONFIG), "--weights", str(WEIGHTS), "--out", str(out)]) == 1  # no silent overwrite


def test_malicious_pickle_is_refused_before_anything_runs(tmp_path):
    import pickle
    import zipfile

    from moebius_jax.convert.errors import UnsafePickleError

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.bin"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"embedding_layer.weight": Exploit()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        moebius_jax.load_model(CONFIG, evil)
    assert not marker.exists()
