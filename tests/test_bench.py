"""The benchmark harness: `python -m bench --quick` writes and prints records with every field
the performance issue asks for, of the right types. Speed is not checked."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import pytest

# bench/ is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import __main__ as cli  # noqa: E402
from bench.harness import HEADER_FIELDS, MEASUREMENT_FIELDS, schema_errors, summarise  # noqa: E402
from bench.inference import FULL, QUICK, inference_cases  # noqa: E402
from bench.report import render  # noqa: E402

# What the issue lists: student forward in both dtypes, encode, decode, tiled decode, pipeline b1 and
# b8, and the train step (student only; with teacher) for the tiny and the full config.
ISSUE_CASES = {"student_forward.float32", "student_forward.bfloat16", "vae_encode", "vae_decode",
               "vae_decode_tiled", "pipeline.b1", "pipeline.b8"}
TRAIN_CASES = {"train_step.tiny_student", "train_step.tiny_distill", "train_step.full_student",
               "train_step.full_distill"}


def _run(argv: list[str]) -> tuple[list[dict], list[str]]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        records = cli.main(argv)
    return records, stdout.getvalue().splitlines()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The cheapest quick case, run in-process (one tiny-student compile, a few runs)."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    records, lines = _run(["--quick", "--only", "student_forward.float32", "--out", str(out)])
    return json.loads(out.read_text()), records, lines


def test_results_file_has_every_field(quick):
    results, records, _ = quick
    assert schema_errors(results["header"], HEADER_FIELDS) == []
    assert results["header"]["mode"] == "quick"
    assert results["measurements"] == records
    (record,) = records
    assert schema_errors(record, MEASUREMENT_FIELDS) == []
    assert (record["name"], record["variant"], record["config"]) == ("student_forward", "float32", "moebius_tiny")
    assert record["shape"] == [2, 16, 16, 9] and record["batch"] == 2


def test_timings_are_consistent(quick):
    _, (record,), _ = quick
    assert not record["compile_only"]
    assert record["compile_s"] > 0 and record["warmup"] == 1 and record["repeats"] >= 1
    assert 0 < record["min_s"] <= record["median_s"] <= record["p90_s"]
    assert record["throughput"] == pytest.approx(record["batch"] / record["median_s"], rel=1e-3)
    assert record["flops"] > 0 and record["flops_source"] == "xla_cost_analysis"
    assert record["peak_memory_bytes"] > 0
    assert record["memory_source"] in ("device_memory_stats", "xla_memory_analysis")


def test_stdout_is_one_json_object_per_measurement(quick):
    _, records, lines = quick
    assert [json.loads(line) for line in lines] == records


def test_compile_only_leaves_timings_empty(tmp_path):
    records, _ = _run(["--quick", "--compile-only", "--only", "vae_decode.128", "--out", str(tmp_path / "r.json")])
    (record,) = records
    assert schema_errors(record, MEASUREMENT_FIELDS) == []
    assert record["compile_only"] and record["repeats"] == 0
    assert record["median_s"] is None and record["throughput"] is None and record["peak_memory_bytes"] > 0


def test_report_has_a_row_per_measurement(quick):
    results, records, _ = quick
    table = render(results).splitlines()
    assert sum(line.startswith("| student_forward.float32 ") for line in table) == len(records)


@pytest.mark.parametrize("sizes", [QUICK, FULL], ids=["quick", "full"])
def test_plans_cover_the_issue(sizes):
    cases = inference_cases(sizes)
    names = {c.key for c in cases} | {c.name for c in cases}
    assert ISSUE_CASES <= names
    assert len({c.key for c in cases}) == len(cases)


def test_full_plan_has_every_train_step():
    _, cases, _ = cli.plan(quick=False, everything=True)
    assert TRAIN_CASES <= {c.key for c in cases}
    assert all(not c.compile_only for c in cases if c.name == "train_step")


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit, match="unknown benchmark"):
        cli.main(["--quick", "--only", "no_such_case", "--list"])


def test_summary_statistics():
    stats = summarise([float(i) for i in range(1, 11)])
    assert stats == {"median_s": 5.5, "p90_s": pytest.approx(9.1), "min_s": 1.0}
