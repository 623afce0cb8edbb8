"""Compile-only reports for a TPU topology on a host without one (moebius_jax.aot, the train.py
and infer.py --compile-only commands). They need libtpu (the `tpu` extra, installed in CI)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import ROOT, fixture_path  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import infer  # noqa: E402
import train  # noqa: E402
from bench import __main__ as bench_cli  # noqa: E402
from bench.harness import schema_errors  # noqa: E402
from bench.report import render_target  # noqa: E402
from bench.target import TARGET_FIELDS, TARGET_HEADER_FIELDS  # noqa: E402
from moebius_jax import aot  # noqa: E402
from moebius_jax.config import load_config  # noqa: E402
from moebius_jax.errors import UserError  # noqa: E402
from moebius_jax.hlo_text import memory_traffic  # noqa: E402
from moebius_jax.inspect_model import TargetCost, format_report, inspect_model  # noqa: E402
from moebius_jax.latents import guidance_task_ids  # noqa: E402
from moebius_jax.loading import abstract_variables, build_model  # noqa: E402

TARGET = "tpu:v5e:2x2"
TINY = ROOT / "configs" / "moebius_tiny.yaml"


def _student_step(images: int, latent: int) -> tuple[object, tuple]:
    """The tiny student's CFG step (bfloat16) and its abstract arguments on one v5e chip."""
    cfg = load_config(TINY)
    model, _ = build_model(cfg, jnp.bfloat16)

    def step(variables, sample, timesteps, ids):
        return model.apply(variables, sample, timesteps, ids).sample

    chip = aot.single_device(TARGET)
    rows = 2 * images
    args = (aot.abstract(abstract_variables(model, cfg), chip),
            jax.ShapeDtypeStruct((rows, latent, latent, cfg.unet.in_channels), jnp.float32, sharding=chip),
            jax.ShapeDtypeStruct((1,), jnp.int32, sharding=chip),
            aot.abstract(jnp.asarray(guidance_task_ids(images, cfg.unet.context_length)), chip))
    return jax.jit(step), args


@pytest.fixture(scope="module")
def student_report() -> aot.CompileReport:
    step, args = _student_step(images=1, latent=16)
    report, _ = aot.compile_report(step, *args, name="tiny student", target=TARGET)
    return report


def test_student_step_report_fields(student_report):
    r = student_report
    assert (r.target, r.devices, r.device_kind, r.chip.name) == (TARGET, 1, "TPU v5 lite", "v5e")
    assert r.chip.hbm_bytes == 16 * 2**30 and r.chip.peak_flops == 197e12 and r.chip.hbm_bandwidth == 819e9
    assert r.flops > 1e8 and r.bytes_accessed > 1e6 and r.compile_seconds > 0
    # bfloat16 parameters are rounded from the float32 ones inside the program: the arguments hold
    # the float32 tree, so they are at least its size.
    assert r.argument_bytes > 1e6 and r.code_bytes > 0 and r.temp_bytes >= 0
    assert r.memory_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes + r.code_bytes
    assert r.fits is True
    assert r.roofline_seconds == pytest.approx(max(r.flops / 197e12, r.bytes_accessed / 819e9))
    assert r.bound == ("compute" if r.flops / 197e12 >= r.bytes_accessed / 819e9 else "memory")
    assert r.loop_cost == "no loops" and r.collectives == ()
    # One chip runs the whole program: the model flops are XLA's own count, within a few percent.
    assert r.model_flops == pytest.approx(r.flops, rel=0.1)
    assert 0 < r.mfu <= 1
    record = r.to_json()
    assert record["memory"]["fits"] is True and record["memory"]["hbm"] == 16 * 2**30
    assert record["bound"] == r.bound and record["flops"] == r.flops
    assert "fits" in r.summary() and "roofline" in r.summary()
    # The float32 parameters are read from HBM at least once; XLA keeps most of the rest on chip.
    assert r.argument_bytes <= r.hbm_bytes < r.bytes_accessed
    assert r.hbm_roofline == (max(r.flops / 197e12, r.hbm_bytes / 819e9),
                              "compute" if r.flops / 197e12 >= r.hbm_bytes / 819e9 else "memory")
    assert record["hbm"]["bytes"] == r.hbm_bytes and record["hbm"]["roofline_seconds"] == r.hbm_roofline[0]
    assert "HBM roofline" in r.summary()


def _mlp_hbm_bytes(rows: int) -> tuple[aot.CompileReport, int]:
    """An MLP whose hidden map (rows x 4096 bf16) is the one large temporary: (report, its bytes)."""
    chip = aot.single_device(TARGET)
    x = jax.ShapeDtypeStruct((rows, 1024), jnp.bfloat16, sharding=chip)
    w1 = jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16, sharding=chip)
    w2 = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16, sharding=chip)
    mlp = jax.jit(lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2 + x)
    report, _ = aot.compile_report(mlp, x, w1, w2, name="mlp", target=TARGET)
    return report, rows * 4096 * 2


def test_hbm_bytes_follow_where_xla_places_the_hidden_map():
    """A 16 MiB hidden map stays in on-chip memory (128 MiB of VMEM on v5e): HBM sees little more
    than the inputs and the output; a 512 MiB one cannot, and is written to HBM and read back."""
    small, hidden = _mlp_hbm_bytes(2048)
    inputs_and_output = (2 * 2048 * 1024 + 2 * 1024 * 4096) * 2
    assert inputs_and_output <= small.hbm_bytes < inputs_and_output + hidden
    assert small.bytes_accessed > small.hbm_bytes + hidden  # XLA's figure counts the on-chip traffic
    large, hidden = _mlp_hbm_bytes(65536)
    assert large.hbm_bytes >= 2 * hidden


def test_memory_traffic_on_hlo_text():
    """Tiles pad the minor dimensions, S(n) names the memory space, async pairs count once (a
    slice-start its slice), loop bodies count, fused computations do not (their fusion does)."""
    hlo = """HloModule m, entry_computation_layout={()->f32[8,128]{1,0}}

%fused (p: bf16[2,40]) -> bf16[2,40] {
  %p = bf16[2,40]{1,0:T(2,128)(2,1)} parameter(0)
  ROOT %n = bf16[2,40]{1,0:T(2,128)(2,1)} negate(%p)
}

%body (s: f32[8,128]) -> f32[8,128] {
  %s = f32[8,128]{1,0:T(8,128)} parameter(0)
  ROOT %e = f32[8,128]{1,0:T(8,128)} exponential(%s)
}

%cond (c: f32[8,128]) -> pred[] {
  %c = f32[8,128]{1,0:T(8,128)} parameter(0)
  ROOT %t = pred[]{:T(128)} constant(true)
}

ENTRY %main (a: bf16[2,40], w: f32[8,128], v: f32[16,128]) -> f32[8,128] {
  %a = bf16[2,40]{1,0:T(2,128)(2,1)} parameter(0)
  %w = f32[8,128]{1,0:T(8,128)} parameter(1)
  %cs = (f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%w)
  %cd = f32[8,128]{1,0:T(8,128)S(1)} copy-done(%cs)
  %v = f32[16,128]{1,0:T(8,128)} parameter(2)
  %ss = ((f32[16,128]{1,0:T(8,128)}), f32[8,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%v), slice={[0:8], [0:128]}
  %sd = f32[8,128]{1,0:T(8,128)S(1)} slice-done(%ss)
  %f = bf16[2,40]{1,0:T(2,128)(2,1)S(1)} fusion(%a), kind=kLoop, calls=%fused
  %l = f32[8,128]{1,0:T(8,128)} while(%cd), condition=%cond, body=%body
  ROOT %r = f32[8,128]{1,0:T(8,128)} add(%l, %cd)
}
"""
    row, tile = 2 * 128 * 2, 8 * 128 * 4  # bf16[2,40] padded to 128 lanes; f32[8,128]
    traffic = memory_traffic(hlo)
    # HBM: copy-start reads w; slice-start reads half of v; the fusion reads a; the loop body
    # reads and writes s; add reads l and writes r. On chip: copy-done's and slice-done's
    # results, the fusion's result, add's second operand.
    assert traffic.by_space == {0: tile + tile + row + 2 * tile + 2 * tile, 1: tile + tile + row + tile}
    assert traffic.device_bytes == 6 * tile + row and traffic.on_chip_bytes == 3 * tile + row


def test_absurd_batch_does_not_fit():
    step, args = _student_step(images=2048, latent=128)
    with pytest.raises(aot.DoesNotFit, match=r"does not fit on tpu:v5e:2x2: .*HBM"):
        report, _ = aot.compile_report(step, *args, name="absurd", target=TARGET)
        report.check_fits()


def test_collectives_parser_on_hlo_text():
    hlo = """
  %ars = (f32[4,8]{1,0}, bf16[2]{0}) all-reduce-start(f32[4,8]{1,0} %a, bf16[2]{0} %b), replica_groups={}
  %ard = (f32[4,8]{1,0}, bf16[2]{0}) all-reduce-done((f32[4,8]{1,0}, bf16[2]{0}) %ars)
  %ag = bf16[16,4]{1,0} all-gather(bf16[4,4]{1,0} %c), dimensions={0}
  %ag.1 = s32[8]{0} all-gather(s32[2]{0} %d), dimensions={0}
  %add = f32[4,8]{1,0} add(f32[4,8]{1,0} %a, f32[4,8]{1,0} %a)
"""
    assert aot.collectives(hlo) == (aot.Collective("all-gather", 2, 16 * 4 * 2 + 8 * 4),
                                    aot.Collective("all-reduce", 1, 4 * 8 * 4 + 2 * 2))


def test_collectives_of_a_sharded_matmul():
    """A matmul whose contraction dimension is split over 4 abstract TPU chips needs one
    all-reduce of the (replicated) float32 result."""
    mesh = jax.make_mesh((4,), ("d",), (AxisType.Auto,), devices=aot.target_devices(TARGET))
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "d")))
    w = jax.ShapeDtypeStruct((512, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("d", None)))
    matmul = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, PartitionSpec()))
    report, _ = aot.compile_report(matmul, x, w, name="matmul", target=TARGET)
    assert report.devices == 4
    assert report.collectives == (aot.Collective("all-reduce", 1, 256 * 128 * 4),)
    # Each chip multiplies its quarter of the contraction; the whole program is 4 times that.
    assert report.flops == pytest.approx(2 * 256 * 128 * 512 / 4, rel=0.05)
    assert report.model_flops == pytest.approx(2 * 256 * 128 * 512, rel=0.05)


def test_unknown_topology_is_a_user_error():
    with pytest.raises(UserError, match="no TPU topology 'v9z:7x7'"):
        aot.target_devices("tpu:v9z:7x7")


TRAIN = ["--config", str(ROOT / "configs" / "train_demo.yaml"), "--compile-only", "--topology", "v5e:2x2",
         "dtype=bfloat16", "optimizer.name=adamw"]


@pytest.mark.slow  # minutes: the tiny train step is the largest program here
def test_train_compile_only_fits(tmp_path, capsys):
    assert train.main(["--workdir", str(tmp_path / "w"), *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "train step (student only, global batch 4) on tpu:v5e:2x2 (4 v5e device(s)" in out
    assert "— fits" in out and "GFLOP" in out and "MFU at most" in out
    assert not (tmp_path / "w").exists()  # compile-only writes nothing


def test_train_compile_only_refuses_an_absurd_batch(tmp_path, capsys):
    """16384 images of 512² (image, masked image, mask) are 28 GiB per chip before any
    activation: refused before compiling."""
    assert train.main(["--workdir", str(tmp_path / "w"), *TRAIN, "data.batch_size=16384",
                       "data.image_size=512"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: train step (student only, global batch 16384) does not fit on tpu:v5e:2x2: "
                          "its arguments alone need 28.")
    assert "GiB per chip, a v5e chip has 16.0 GiB HBM" in err and len(err.strip().splitlines()) == 1


INFER = ["--compile-only", "--topology", "v5e:2x2", "--config", str(TINY), "--vae", str(fixture_path("vae_tiny")),
         "--steps", "2", "--dtype", "bfloat16"]


@pytest.mark.slow  # about two minutes on 2 loaded cores
def test_infer_compile_only_fits(capsys):
    assert infer.main([*INFER, "--resolution", "128", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "sampler (2 steps, 4 image(s) of 128², bfloat16) on tpu:v5e:2x2 (4 v5e device(s)" in out
    assert "— fits" in out


def test_infer_compile_only_refuses_an_absurd_batch(capsys):
    assert infer.main([*INFER, "--resolution", "1024", "--batch-size", "4096"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sampler (2 steps, 4096 image(s) of 1024², bfloat16) does not fit on tpu:v5e:2x2")
    assert "GiB per chip" in err and "HBM" in err


def test_bench_target_plan_lists_the_train_steps(capsys):
    assert bench_cli.main(["--target", TARGET, "--quick", "--list"]) == []
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert keys == ["student_forward.b1", "student_forward.b8", "student_forward.b1_float32_params",
                    "vae_encode.128", "vae_decode.128", "pipeline.b1", "train_step.student_b8",
                    "train_step.distill_b8"]


@pytest.mark.slow  # a minute: one tiny-student compile
def test_bench_target_record_and_report(tmp_path):
    out = tmp_path / "tpu.json"
    with contextlib.redirect_stdout(io.StringIO()):
        bench_cli.main(["--target", TARGET, "--quick", "--only", "student_forward.b1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert schema_errors(results["header"], TARGET_HEADER_FIELDS) == []
    (record,) = results["measurements"]
    assert schema_errors(record, TARGET_FIELDS) == []
    assert record["memory"]["fits"] is True and record["flops"] > 1e8 and record["bound"] == "memory"
    table = render_target(results).splitlines()
    assert table[0].startswith(results["header"]["date"][:10] + ", target tpu:v5e:2x2: 4 × TPU v5 lite")
    assert table[-1].startswith("| student_forward.b1 | moebius_tiny | bfloat16 / bfloat16 | 2×16×16×9 | 1 |")


@pytest.mark.slow  # a minute: the tiny student's modules and CFG step compiled for one chip
def test_inspect_target_rows_carry_hbm_bytes():
    ins = inspect_model(TINY, resolution=128, images=1, target=TARGET, dtype="bfloat16")
    costs = [r.on_target for r in ins.rows if r.on_target is not None]
    assert len(costs) == len(ins.rows) and all(0 < c.hbm_bytes < c.bytes_accessed for c in costs)
    assert ins.target_step.hbm_bytes == TargetCost.of(ins.target_step).hbm_bytes
    header = next(line for line in format_report(ins).splitlines() if "chip GFLOP" in line)
    assert "HBM GB" in header and header.count("roofline") == 2
