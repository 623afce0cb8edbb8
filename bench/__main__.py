"""Run the benchmark set that fits this machine and write bench/results/<device>.json.

    python -m bench                  # full sizes (512^2, 20 steps); on a CPU, the subset that fits
    python -m bench --quick          # tiny configs, few repeats: a couple of minutes on 2 CPU cores
    python -m bench --all            # full sizes, including what a CPU takes tens of minutes for
    python -m bench --only student_forward vae_decode.512   # families or name.variant keys
    python -m bench --compile-only   # compile times, FLOPs and memory plans; nothing runs
    python -m bench --list           # the plan, without running anything

Each measurement is printed to stdout as one JSON line as it completes (progress goes to
stderr) and the results file is rewritten after each, so an interrupted run keeps what it
measured. With --only and no --out, the file's other measurements are kept. `python -m
bench.report` renders a results file as the README's markdown table.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from moebius_jax import cli
from moebius_jax.errors import UserError
from moebius_jax.io_safety import atomic_output, check_output_file

from bench.harness import REPO, Case, Repeats, device, device_slug, header, measure, progress
from bench.inference import FULL, FULL_CPU, FULL_CPU_ALL, QUICK, inference_cases
from bench.training import FULL as TRAIN_FULL
from bench.training import FULL_CPU as TRAIN_FULL_CPU
from bench.training import FULL_CPU_ALL as TRAIN_FULL_CPU_ALL
from bench.training import TINY, training_cases
from bench.versus_torch import torch_cases

RESULTS = REPO / "bench" / "results"


def plan(quick: bool, everything: bool) -> tuple[str, list[Case], Repeats]:
    """(mode, cases, repeats) for this machine: accelerators get the issue's sizes, bfloat16
    training and more repeats; a CPU gets float32 training (bfloat16 is emulated there), the
    sizes that finish in reasonable time unless `everything`, and the PyTorch versions of the
    student step and the decode when torch is installed."""
    if quick:
        # The distillation step is left to the full set: each tiny train step compiles for
        # minutes on 2 CPU cores (mostly Muon's per-parameter Newton-Schulz chains).
        train = [c for c in training_cases((TINY,), "float32", 20.0) if c.variant == "tiny_student"]
        return "quick", inference_cases(QUICK) + torch_cases(QUICK) + train, Repeats(warmup=1, repeats=3)
    if device().platform != "cpu":
        cases = inference_cases(FULL) + training_cases((TINY, TRAIN_FULL), "bfloat16", 60.0)
        return "full", cases, Repeats(warmup=3, repeats=20)
    sizes, train = (FULL_CPU_ALL, TRAIN_FULL_CPU_ALL) if everything else (FULL_CPU, TRAIN_FULL_CPU)
    cases = inference_cases(sizes) + torch_cases(sizes) + training_cases((TINY, train), "float32", 600.0)
    return ("all" if everything else "full"), cases, Repeats(warmup=1, repeats=5)


def select(cases: list[Case], only: list[str] | None) -> list[Case]:
    """Cases whose family name or name.variant key is in `only` (all when None)."""
    if not only:
        return cases
    known = {c.name for c in cases} | {c.key for c in cases}
    unknown = sorted(set(only) - known)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; this plan has: {', '.join(c.key for c in cases)}")
    return [c for c in cases if c.name in only or c.key in only]


def _key(record: dict[str, Any]) -> str:
    return f"{record['name']}.{record['variant']}"


def write(path: pathlib.Path, run_header: dict[str, Any], records: list[dict[str, Any]],
          kept: list[dict[str, Any]]) -> None:
    """Results file: {"header": ..., "measurements": [...]}, `kept` first (those not re-measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = {_key(r) for r in records}
    measurements = [r for r in kept if _key(r) not in fresh] + records
    with atomic_output(path) as tmp:  # an interrupted run keeps the previous complete file
        tmp.write_text(json.dumps({"header": run_header, "measurements": measurements}, indent=1) + "\n")


def read_kept(path: pathlib.Path) -> list[dict[str, Any]]:
    """The measurements of an existing results file (refused, naming it, if it is not one)."""
    try:
        return list(json.loads(path.read_text())["measurements"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a bench results file ({err}); move it or pass --out") from None


@cli.entry_point
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = cli.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny configs and few repeats (CI)")
    parser.add_argument("--all", action="store_true", help="on a CPU, also the cases that take tens of minutes")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="families or name.variant keys to run")
    parser.add_argument("--out", type=pathlib.Path, help="results file (default bench/results/<device>.json)")
    parser.add_argument("--compile-only", action="store_true", help="compile and analyse, run nothing")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)

    mode, cases, repeats = plan(args.quick, args.all)
    cases = select(cases, args.only)
    if args.list:
        for case in cases:
            print(f"{case.key:28s} {case.config:14s} {case.dtype:9s} {'x'.join(map(str, case.shape))}"
                  f"{'  (compile only)' if case.compile_only else ''}")
        return []

    slug = device_slug(device().device_kind) + ("-quick" if args.quick else "")
    out = check_output_file(args.out or RESULTS / f"{slug}.json", "--out")
    # A partial run (--only) into the default file updates it instead of replacing it.
    kept = read_kept(out) if args.only and not args.out and out.exists() else []
    run_header = header(mode)
    progress(f"bench: {mode} mode on {run_header['device_kind']} ({run_header['cpu_count']} CPU cores), "
             f"{len(cases)} case(s) -> {out}")
    records: list[dict[str, Any]] = []
    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.key} ({case.config}, {case.dtype}, {'x'.join(map(str, case.shape))})")
        record = measure(case, repeats, args.compile_only)
        records.append(record)
        print(json.dumps(record), flush=True)
        write(out, run_header, records, kept)
    return records


if __name__ == "__main__":
    outcome = main(sys.argv[1:])
    sys.exit(outcome if isinstance(outcome, int) else 0)  # the records on success, a status on error
