"""The one measurement helper every benchmark goes through, and the result schema.

A `Case` names a measurement and knows how to build its `Program` (how to trace it on
abstract arguments, and how to make the concrete ones). `measure` lowers and compiles it
ahead of time (timed), runs it for warm-up, then times N runs with `block_until_ready`, and
returns one flat JSON-able dict (`MEASUREMENT_FIELDS` lists every key and its type). Nothing
here knows about models.

Memory: `device.memory_stats()` where the backend has it (GPU, TPU); it is the process-wide
high-water mark, so in a run of several cases it includes earlier, larger ones (run a case
alone with `--only` for its own figure). Elsewhere (CPU) XLA's buffer plan for the compiled
program: arguments + outputs + temporaries, an upper bound of what the call needs.
`memory_source` says which.

FLOPs: XLA's cost analysis of the compiled program. It counts a loop body once, so programs
with a scan (the sampler, tiled decode) pass their own count, summed from the cost analyses
of their loop-free parts; `flops_source` says which.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import numpy as np

from moebius_jax import aot

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every key of a measurement and the types its value may have (None only where listed).
MEASUREMENT_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),  # family, e.g. "student_forward"
    "variant": (str,),  # distinguishes cases of one family, e.g. "float32", "b8"
    "config": (str,),  # model config, e.g. "moebius", "sd_vae"
    "dtype": (str,),  # compute dtype (parameters stay float32)
    "shape": (list,),  # the main input's shape
    "batch": (int,),
    "details": (dict,),  # case-specific settings (steps, tile, ...)
    "device_kind": (str,),
    "platform": (str,),
    "jax_version": (str,),
    "git_commit": (str, type(None)),
    "compile_only": (bool,),
    "compile_s": (float,),  # lower + compile
    "warmup": (int,),
    "repeats": (int,),
    "median_s": (float, type(None)),  # None only when compile_only
    "p90_s": (float, type(None)),
    "min_s": (float, type(None)),
    # Process CPU seconds per timed call, all threads: on a shared CPU host the wall time grows
    # with other load while this does not (CPU / wall = cores effectively used).
    "median_cpu_s": (float, type(None)),
    "calls_per_s": (float, type(None)),  # 1 / median: steps/s for a train step
    "throughput": (float, type(None)),  # batch / median, in throughput_unit
    "throughput_unit": (str,),
    "flops": (float, type(None)),  # per call
    "flops_source": (str, type(None)),  # "xla_cost_analysis" | "xla_cost_analysis_of_parts"
    "tflops_per_s": (float, type(None)),
    "mfu": (float, type(None)),  # flops / time / the device's dense peak, where the peak is known
    "peak_memory_bytes": (int, type(None)),
    "memory_source": (str, type(None)),  # "device_memory_stats" | "xla_memory_analysis"
    "host_load": (float, type(None)),  # 1-minute load average when the case finished
    "timestamp": (str,),
}

HEADER_FIELDS: dict[str, tuple[type, ...]] = {
    "date": (str,),
    "host": (str,),
    "device_kind": (str,),
    "platform": (str,),
    "device_count": (int,),
    "cpu_model": (str, type(None)),
    "cpu_count": (int,),
    "load_average": (list, type(None)),  # 1/5/15-minute load when the run started (shared hosts)
    "jax_version": (str,),
    "flax_version": (str,),
    "python_version": (str,),
    "git_commit": (str, type(None)),
    "git_dirty": (bool, type(None)),
    "mode": (str,),  # "quick" | "full" | "all"
}

@dataclasses.dataclass(frozen=True)
class Program:
    """What to compile and call.

    `trace(*abstract_args)` gives the jax Traced (`bench.target` compiles the same program for
    another target from its jaxpr and shardings); `make_args()` builds the concrete (dynamic)
    arguments, only when the program is going to run (compile-only cases never allocate
    them). `flops`, when set, replaces XLA's count (see the module docstring). `threaded`:
    each call returns the next call's first argument first, as a training step returns its
    (donated) state.
    """

    trace: Callable[..., jax.stages.Traced]
    abstract_args: tuple[Any, ...]
    make_args: Callable[[], tuple[Any, ...]]
    flops: float | None = None
    threaded: bool = False


@dataclasses.dataclass(frozen=True)
class Case:
    """One planned measurement. `build` is only called when the case runs, so a plan is cheap."""

    name: str
    variant: str
    config: str
    dtype: str
    shape: tuple[int, ...]
    batch: int
    unit: str  # what `batch` counts, for the throughput ("images/s", "samples/s")
    build: Callable[[], Program]
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    compile_only: bool = False  # plan the memory only (too slow or too big to run here)
    budget_s: float = 60.0  # timed runs stop at `repeats` or when this much time is spent

    @property
    def key(self) -> str:
        return f"{self.name}.{self.variant}"

    def identity(self) -> dict[str, Any]:
        """The fields every result record starts with: what was measured, on which input."""
        return {"name": self.name, "variant": self.variant, "config": self.config, "dtype": self.dtype,
                "shape": list(self.shape), "batch": self.batch, "details": dict(self.details)}


@dataclasses.dataclass(frozen=True)
class Repeats:
    """Untimed warm-up calls, then at most `repeats` timed ones (fewer if a case's budget runs out)."""

    warmup: int
    repeats: int


def device() -> jax.Device:
    """The device every case runs on (the first one: the benchmarks are single-device)."""
    return jax.devices()[0]


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository, or (None, None) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def _cpu_model() -> str | None:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_count() -> int:
    # The cores this process may use, which is what XLA's CPU thread pool gets.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def header(mode: str) -> dict[str, Any]:
    """Who, where and what: the results file's first object."""
    dev = device()
    commit, dirty = git_state()
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "cpu_model": _cpu_model(),
        "cpu_count": _cpu_count(),
        "load_average": [round(x, 2) for x in load] if load else None,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python_version": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "mode": mode,
    }


def device_slug(kind: str) -> str:
    """A file-name-safe device kind: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "device"


def peak_flops(kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a device kind at a compute dtype (`moebius_jax.aot.CHIPS`), None
    for kinds it does not list (CPUs): MFU is left out for those."""
    chip = aot.chip_for_kind(kind)
    return None if chip is None else chip.peak(dtype)


def _xla_flops(compiled: jax.stages.Compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returns one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _xla_memory(compiled: jax.stages.Compiled) -> int | None:
    # Donated arguments are counted as arguments and outputs both; alias bytes undo that.
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def _device_peak_memory() -> int | None:
    stats = device().memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def summarise(times: list[float]) -> dict[str, float | None]:
    """median / p90 (linear interpolation, as numpy) / min of the timed runs, in seconds."""
    if not times:
        return {"median_s": None, "p90_s": None, "min_s": None}
    arr = np.asarray(times)
    return {"median_s": float(np.median(arr)), "p90_s": float(np.percentile(arr, 90)), "min_s": float(arr.min())}


def progress(message: str) -> None:
    """Progress goes to stderr so stdout stays one JSON object per line."""
    print(message, file=sys.stderr, flush=True)


def _timed_calls(compiled: jax.stages.Compiled, program: Program, repeats: Repeats, budget_s: float
                 ) -> tuple[list[float], list[float]]:
    """Warm-up calls, then timed calls until `repeats` or `budget_s`: (wall, process CPU) seconds."""
    args = jax.block_until_ready(jax.device_put(program.make_args()))  # no host transfers while timing

    def call() -> None:
        nonlocal args
        out = jax.block_until_ready(compiled(*args))
        if program.threaded:
            args = (out[0], *args[1:])

    for i in range(repeats.warmup):
        start = time.perf_counter()
        call()
        progress(f"  warm-up {i + 1}/{repeats.warmup}: {time.perf_counter() - start:.3f} s")
    wall: list[float] = []
    cpu: list[float] = []
    # At least one timed call; then stop at `repeats` or before the next would overrun the budget.
    while len(wall) < repeats.repeats and (not wall or sum(wall) + wall[-1] <= budget_s):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        progress(f"  run {len(wall)}: {wall[-1]:.3f} s (process CPU {cpu[-1]:.3f} s)")
    return wall, cpu


def measure(case: Case, repeats: Repeats, compile_only: bool = False) -> dict[str, Any]:
    """Build, compile (timed), warm up and time `case`; one flat dict (see MEASUREMENT_FIELDS)."""
    compile_only = compile_only or case.compile_only
    program = case.build()
    progress(f"  compiling {case.key}")
    start = time.perf_counter()
    compiled = program.trace(*program.abstract_args).lower().compile()
    compile_s = time.perf_counter() - start
    progress(f"  compiled in {compile_s:.1f} s")

    wall, cpu = ([], []) if compile_only else _timed_calls(compiled, program, repeats, case.budget_s)
    stats = summarise(wall)
    flops = program.flops if program.flops is not None else _xla_flops(compiled)
    flops_source = None if flops is None else (
        "xla_cost_analysis_of_parts" if program.flops is not None else "xla_cost_analysis")
    median = stats["median_s"]
    achieved = flops / median if flops and median else None
    peak = peak_flops(device().device_kind, case.dtype)
    memory = None if compile_only else _device_peak_memory()
    memory_source = "device_memory_stats"
    if memory is None:
        memory, memory_source = _xla_memory(compiled), "xla_memory_analysis"
    commit, _ = git_state()
    return {
        **case.identity(),
        "device_kind": device().device_kind,
        "platform": device().platform,
        "jax_version": jax.__version__,
        "git_commit": commit,
        "compile_only": compile_only,
        "compile_s": round(compile_s, 3),
        "warmup": 0 if compile_only else repeats.warmup,
        "repeats": len(wall),
        **{k: None if v is None else round(v, 6) for k, v in stats.items()},
        "median_cpu_s": round(float(np.median(cpu)), 6) if cpu else None,
        "calls_per_s": round(1 / median, 6) if median else None,
        "throughput": round(case.batch / median, 4) if median else None,
        "throughput_unit": case.unit,
        "flops": flops,
        "flops_source": flops_source,
        "tflops_per_s": round(achieved / 1e12, 4) if achieved else None,
        "mfu": round(achieved / peak, 4) if achieved and peak else None,
        "peak_memory_bytes": memory,
        "memory_source": memory_source if memory is not None else None,
        "host_load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def schema_errors(record: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]]) -> list[str]:
    """Missing keys and wrongly typed values of `record` (bool is not accepted as int)."""
    errors = []
    for key, types in fields.items():
        if key not in record:
            errors.append(f"missing {key}")
            continue
        value = record[key]
        if isinstance(value, bool) and bool not in types:
            errors.append(f"{key}: bool where {types} expected")
        elif not isinstance(value, types):
            errors.append(f"{key}: {type(value).__name__} where {[t.__name__ for t in types]} expected")
    return errors
