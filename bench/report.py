"""Render a results file as the README's markdown performance table.

    python -m bench.report [bench/results/cpu.json]
    python -m bench.report bench/results/tpu-v5e-2x2.json   # a --target file: compile-only figures
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from bench.harness import REPO


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.3g} s"


def _bytes(value: int | None, source: str | None) -> str:
    if value is None:
        return "—"
    text = f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"
    # XLA's buffer plan is an upper bound, not a measured high-water mark.
    return f"{text} (plan)" if source == "xla_memory_analysis" else text


def _flops(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e12:.3f} T" if value >= 1e11 else f"{value / 1e9:.2f} G"


def _throughput(m: dict[str, Any]) -> str:
    text = f"{m['throughput']:.3g} {m['throughput_unit']}"
    return f"{text} ({m['calls_per_s']:.3g} steps/s)" if m["name"] == "train_step" else text


def row(m: dict[str, Any], with_mfu: bool) -> str:
    shape = "×".join(map(str, m["shape"]))
    details = m["details"]
    # The name.variant key is what `python -m bench --only` takes.
    what = f"{m['name']}.{m['variant']}" + (f" (tile {details['tile']}/{details['overlap']})" if "tile" in details else "")
    if m["compile_only"]:
        timing = ["compile only", "—", "—", "—", "—"]
    else:
        timing = [_seconds(m["median_s"]), _seconds(m["p90_s"]), _seconds(m["median_cpu_s"]), _throughput(m),
                  "—" if m["tflops_per_s"] is None else f"{m['tflops_per_s']:.3f}"]
    if with_mfu:
        timing.append("—" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%")
    cells = [what, m["config"], m["dtype"], shape, f"{m['compile_s']:.1f} s", *timing,
             _flops(m["flops"]), _bytes(m["peak_memory_bytes"], m["memory_source"])]
    return "| " + " | ".join(cells) + " |"


def render(results: dict[str, Any]) -> str:
    """A caption (date, device, versions, load) and one table row per measurement."""
    h = results["header"]
    measurements = results["measurements"]
    cpu = f" ({h['cpu_model']}, {h['cpu_count']} cores)" if h["platform"] == "cpu" else ""
    commit = (h["git_commit"] or "unknown")[:7] + (" + local changes" if h["git_dirty"] else "")
    load = f"; load average at start {h['load_average'][0]:.1f}" if h["load_average"] else ""
    caption = (f"{h['date'][:10]}, {h['device_kind']}{cpu}, jax {h['jax_version']}, commit {commit}, "
               f"`python -m bench` {h['mode']} mode{load}. Random weights; median and p90 of the timed "
               f"runs after warm-up; host CPU = process CPU time per call (all threads); FLOPs from "
               f"XLA's cost analysis; memory \"(plan)\" = XLA's buffer plan (arguments + outputs + "
               f"temporaries), otherwise the device's peak.")
    with_mfu = any(m["mfu"] is not None for m in measurements)
    columns = ["Benchmark", "Config", "dtype", "Input", "Compile", "Median", "p90", "Host CPU", "Throughput",
               "TFLOP/s", *(["MFU"] if with_mfu else []), "FLOPs/call", "Peak memory"]
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [row(m, with_mfu) for m in measurements]
    return "\n".join(lines)


def _gigabytes(value: float) -> str:
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.1f} MB"


def _collectives(items: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['kind']} ×{c['count']} ({c['bytes'] / 2**20:.1f} MiB)" for c in items) or "none"


def target_row(m: dict[str, Any]) -> str:
    memory = m["memory"]
    used = _bytes(memory["total"], None)
    if memory["hbm"] is not None:
        used += f" of {memory['hbm'] / 2**30:.0f} GiB" + ("" if memory["fits"] else " **does not fit**")
    roofline = "—" if m["roofline_seconds"] is None else f"{_seconds(m['roofline_seconds'])} ({m['bound']})"
    hbm = m.get("hbm")
    hbm_cells = ["—", "—"] if hbm is None else [
        _gigabytes(hbm["bytes"]), f"{_seconds(hbm['roofline_seconds'])} ({hbm['bound']})"]
    mfu = "—" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    if hbm is not None and hbm["mfu"] is not None:
        mfu += f" / {100 * hbm['mfu']:.1f}%"
    cells = [f"{m['name']}.{m['variant']}", m["config"], f"{m['dtype']} / {m['param_dtype']}",
             "×".join(map(str, m["shape"])), str(m["devices"]), f"{m['compile_seconds']:.0f} s", used,
             _bytes(memory["generated_code"], None), _flops(m["flops"]), _gigabytes(m["bytes_accessed"]),
             roofline, *hbm_cells, mfu, _collectives(m["collectives"])]
    return "| " + " | ".join(cells) + " |"


def render_target(results: dict[str, Any]) -> str:
    """A `--target` file: a caption (date, topology, chip, versions) and one row per program."""
    h = results["header"]
    chip = h["chip"]
    facts = ("" if chip is None else f" ({chip['name']}: {chip['hbm_bytes'] / 2**30:.0f} GiB HBM, "
             f"{chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bandwidth'] / 1e9:.0f} GB/s)")
    commit = (h["git_commit"] or "unknown")[:7] + (" + local changes" if h["git_dirty"] else "")
    libtpu = f", libtpu {h['libtpu_version']}" if h["libtpu_version"] else ""
    caption = (f"{h['date'][:10]}, target {h['target']}: {h['device_count']} × {h['device_kind']}{facts}; "
               f"jax {h['jax_version']}, jaxlib {h['jaxlib_version']}{libtpu}; commit {commit}; "
               f"`python -m bench --target {h['target']}` {h['mode']} mode, compiled on {h['cpu_count']} CPU "
               f"cores, nothing run. Per chip: memory = arguments + outputs + temporaries + code (XLA's plan), "
               f"FLOPs and bytes accessed from XLA's cost analysis (loops counted per iteration on one chip); "
               f"roofline = max(FLOPs / peak, bytes / bandwidth) and what bounds it; HBM bytes = the part "
               f"of the bytes in HBM after XLA's memory-space assignment (the rest is on-chip memory), and "
               f"the roofline with them alone; MFU = the whole program's FLOPs / (chips × peak × roofline), "
               f"the best the figures allow (with either roofline).")
    columns = ["Program", "Config", "dtype / params", "Input", "Chips", "Compile", "Memory per chip", "Code",
               "FLOPs", "Bytes", "Roofline", "HBM bytes", "HBM roofline", "MFU", "Collectives"]
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [target_row(m) for m in results["measurements"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=pathlib.Path, default=REPO / "bench" / "results" / "cpu.json")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(render_target(results) if "target" in results["header"] else render(results))


if __name__ == "__main__":
    main()
