"""Sharding as data: the rule list, `train.py --print-shardings` and batch inference on an
8-device CPU mesh (subprocesses: the host device count must be set before JAX starts), and
frozen networks stored in their compute dtype."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, fixture_path
from jax.sharding import PartitionSpec as P

from moebius_jax.loading import build_model, init_variables
from moebius_jax.train.config import MeshConfig
from moebius_jax.train.mesh import check_rules, fsdp_spec, make_mesh, partition_spec
from moebius_jax.train.program import _store
from moebius_jax.vae_loading import load_vae

EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


class FakeMesh:
    """What `partition_spec` reads of a mesh: its axis sizes."""

    shape = {"data": 2, "fsdp": 4}
    axis_names = ("data", "fsdp")


RULES = check_rules([["embedding", "replicate"], ["conv_in/kernel", [None, None, None, "fsdp"]],
                     ["proj_in", [["data", "fsdp"]]], [".*", "fsdp"]])


def test_fsdp_rule_shards_the_largest_divisible_dimension():
    assert fsdp_spec((3, 3, 320, 640), 4) == P(None, None, None, "fsdp")
    assert fsdp_spec((3, 3, 640, 322), 4) == P(None, None, "fsdp", None)  # 322 is not divisible
    assert fsdp_spec((320,), 4) == P()  # under 4096 elements: not worth a collective
    assert fsdp_spec((4097,), 4) == P()  # nothing divisible
    assert fsdp_spec((3, 3, 320, 640), 1) == P()


def test_rules_first_match_decides():
    mesh = FakeMesh()
    assert partition_spec("params/embedding_layer/embedding", (20, 4096), mesh, RULES) == P()
    assert partition_spec("params/diff_model/conv_in/kernel", (3, 3, 9, 320), mesh, RULES) == \
        P(None, None, None, "fsdp")
    assert partition_spec("opt_state/mu/proj_in/kernel", (64, 40), mesh, RULES) == P(("data", "fsdp"))
    assert partition_spec("params/diff_model/conv_out/kernel", (3, 3, 320, 4), mesh, RULES) == \
        P(None, None, "fsdp", None)
    assert partition_spec("anything", (64, 64), mesh, ()) == P()  # no rule: replicated
    assert check_rules(MeshConfig().rules) == ((".*", "fsdp"),)  # the default


@pytest.mark.parametrize("rules, message", [
    ([["x"]], r"mesh.rules\[0\]: expected a \[regex, spec\] pair"),
    ([["(", "fsdp"]], "not a regular expression"),
    ([[".*", "shard"]], "'shard' is not 'fsdp', 'replicate' or a list"),
    ([[".*", [None, "model"]]], "unknown mesh axis 'model'"),
])
def test_bad_rules_are_named(rules, message):
    with pytest.raises(ValueError, match=message):
        check_rules(rules)


def test_explicit_specs_must_fit_the_array():
    with pytest.raises(ValueError, match=r"mesh.rules\[1\].*dimension 3 of params/conv_in/kernel.*not divisible by 4"):
        partition_spec("params/conv_in/kernel", (3, 3, 9, 322), FakeMesh(), RULES)
    with pytest.raises(ValueError, match="has 4 entries but params/conv_in/kernel has shape"):
        partition_spec("params/conv_in/kernel", (3, 9), FakeMesh(), RULES)


def test_make_mesh_checks_the_device_count():
    devices = jax.devices()[:1]
    assert make_mesh(-1, 1, devices).shape == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="mesh.fsdp: 2 does not divide the 1 devices"):
        make_mesh(-1, 2, devices)


def test_print_shardings_on_8_devices():
    rules = '[[inverted_conv, replicate], ["conv_in/conv_pw/kernel", [null, null, null, fsdp]], [".*", fsdp]]'
    cmd = [sys.executable, "train.py", "--config", "configs/distill_demo.yaml", "--workdir", "/nonexistent",
           "--print-shardings", "mesh.data=2", "mesh.fsdp=4", f"mesh.rules={rules}", "teacher.dtype=bfloat16"]
    out = subprocess.run(cmd, env=EIGHT_DEVICES, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "mesh {'data': 2, 'fsdp': 4} over 8 cpu devices"
    rows = {line.split("  ")[0]: line.split("  ")[1:] for line in lines if line.count("  ") == 3}
    block = "params/diff_model/down_blocks_1/attentions_0/transformer_blocks_0/ff/"
    # The first matching rule decides: replicate (rule 0), an explicit spec (rule 1), the fsdp
    # rule (largest divisible dimension, arrays of at least 4096 elements).
    assert rows[block + "inverted_conv/kernel"] == ["(1, 1, 64, 320)", "float32", "P()"]
    assert rows["params/diff_model/conv_in/conv_pw/kernel"] == \
        ["(1, 1, 9, 32)", "float32", "P(None, None, None, 'fsdp')"]
    assert rows[block + "point_conv/kernel"][2] == "P(None, None, 'fsdp', None)"
    assert rows["params/diff_model/conv_in/bn1/scale"][2] == "P()"
    sharded = [path for path, (_, _, spec) in rows.items() if "fsdp" in spec]
    assert any(p.startswith("vae/") for p in sharded) and any(p.startswith("teacher/") for p in sharded)
    # The bfloat16 teacher keeps its matrices in bfloat16, its vectors in float32.
    for path, (shape, dtype, _) in rows.items():
        if path.startswith("teacher/params/"):
            assert dtype == ("bfloat16" if len(ast.literal_eval(shape)) >= 2 else "float32"), path
    assert lines[-1].endswith("MiB per device") and len(rows) > 100


@pytest.mark.slow  # a process on 8 devices compiling the tiny sampler: over a minute of CPU
def test_sampler_spreads_a_batch_over_8_devices():
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "sampler_devices.py")], env=EIGHT_DEVICES,
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["output_devices"] == 8  # one image per device
    # Three images run padded to eight rows, by the same program: their rows are exactly those
    # of the full batch, and equal to one device's up to float rounding.
    assert result["shape"] == [3, 32, 32, 3] and not result["recompiled"]
    assert result["padded_vs_full"] == 0.0
    assert result["max_diff"] <= 1e-4, result["max_diff"]  # of [0, 1] pixels; measured 1.3e-5


# The bfloat16 teacher compiles twice (bfloat16 and float32 matrices): about two minutes of CPU.
@pytest.mark.parametrize("network", [pytest.param("teacher", marks=pytest.mark.slow), "vae"])
def test_frozen_matrices_in_the_compute_dtype_change_nothing(network):
    """Every use of a frozen network's matrices casts them to its compute dtype, so storing them
    in bfloat16 gives bit-identical outputs."""
    if network == "teacher":
        model, cfg = build_model(ROOT / "configs" / "pixelhacker_tiny.yaml", jnp.bfloat16)
        variables = init_variables(model, cfg, 0)
        rng = np.random.default_rng(0)
        args = (rng.standard_normal((2, 16, 16, cfg.unet.in_channels)).astype(np.float32),
                np.array([900, 10], np.int32), np.tile(np.arange(cfg.unet.context_length, dtype=np.int32), (2, 1)))
        run = jax.jit(lambda v, *a: model.apply(v, *a).sample)
    else:
        vae, variables = load_vae(fixture_path("vae_tiny"), dtype=jnp.bfloat16)
        args = (np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32),)
        run = jax.jit(lambda v, x: vae.apply(v, vae.apply(v, x, method="encode")[0], method="decode"))
    stored = _store(variables, jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(stored) if x.ndim >= 2}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(run(stored, *args), run(variables, *args))
