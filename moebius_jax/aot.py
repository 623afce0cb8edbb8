"""Compile ahead of time for a target you may not have: fit, cost and collectives of a program.

`python -m bench --target tpu:v5e:2x2`, `train.py --compile-only --topology v5e:4x4` and
`python -m moebius_jax.inspect_model --target tpu:v5e:2x2` all go through here. A target is

* `tpu:<topology>` (`tpu:v5e:2x2`, `tpu:v5p:2x2x1`, `tpu:v6e:2x2`, `tpu:v5e:4x4` multi-host, ...):
  abstract TPU devices from libtpu (the `tpu` extra), which programs can be lowered and compiled
  for on any host, CPU-only included — compiled, never run;
* `gpu` / `cpu`: this host's devices of that platform.

`compile_report` lowers a jitted function on `jax.ShapeDtypeStruct`s (shardings attached),
compiles it and reads XLA's own figures: per-chip memory (arguments, outputs, temporaries,
generated code) against the chip's HBM, flops and bytes accessed, the roofline time they imply,
and the collectives in the compiled program (kind, count, bytes), so sharding mistakes show.
XLA's `optimal_seconds` is not used: it is unreliable (negative for the full student).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """What one device offers: memory, peak dense bfloat16 FLOP/s and memory bandwidth."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


# Per device as JAX sees it (one chip for these TPUs, whose TensorCores are fused "megacore" or
# single). Sources: cloud.google.com/tpu/docs/v5e, /v5p and /v6e ("System architecture" tables:
# HBM capacity, peak bf16 compute, HBM bandwidth); NVIDIA H100 / H200 SXM datasheets (dense
# BF16 without sparsity; HBM3 / HBM3e bandwidth).
CHIPS: dict[str, Chip] = {
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
    "NVIDIA H100 80GB HBM3": Chip("H100", 80 * 10**9, 989e12, 3.35e12),
    "NVIDIA H200": Chip("H200", 141 * 10**9, 989e12, 4.8e12),
}


def chip_of(device: jax.Device) -> Chip | None:
    """The facts of `device`'s kind, or None for kinds the table does not know (e.g. CPUs)."""
    return CHIPS.get(device.device_kind)


def target_devices(target: str) -> list[jax.Device]:
    """Devices for `tpu:<topology>`, `gpu` or `cpu` (see the module docstring)."""
    kind, _, topology = target.partition(":")
    if kind == "tpu" and topology:
        from jax.experimental import topologies

        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
        except Exception as e:  # libtpu missing, or a topology it refuses
            raise ValueError(
                f"target {target!r}: no TPU topology {topology!r} ({str(e).splitlines()[0]}); install the "
                "tpu extra (pip install -e '.[tpu]') and use names like v5e:2x2, v5p:2x2x1, v6e:2x2"
            ) from None
    if kind in ("gpu", "cpu", "tpu") and not topology:
        try:
            return list(jax.devices(kind))
        except RuntimeError:
            raise ValueError(f"target {target!r}: this host has no {kind} devices") from None
    raise ValueError(f"target {target!r}: expected tpu:<topology> (e.g. tpu:v5e:2x2), gpu or cpu")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
    count: int  # ops in the program text (an op inside a loop body counts once)
    bytes: int  # sum of their result sizes


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """XLA's figures for one compiled program, per device (an SPMD program is per device)."""

    name: str
    target: str
    devices: int
    compile_seconds: float
    flops: float
    bytes_accessed: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    collectives: tuple[Collective, ...]
    chip: Chip | None

    @property
    def memory_bytes(self) -> int:
        """Device memory the program needs: live arguments and outputs (donated ones counted once),
        temporaries and the generated code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.chip is None else self.memory_bytes <= self.chip.hbm_bytes

    @property
    def roofline_seconds(self) -> float | None:
        """The lower bound flops and bytes set: max(flops / peak, bytes / bandwidth)."""
        if self.chip is None:
            return None
        return max(self.flops / self.chip.peak_flops, self.bytes_accessed / self.chip.hbm_bandwidth)

    @property
    def bound(self) -> str | None:
        if self.chip is None:
            return None
        compute = self.flops / self.chip.peak_flops
        return "compute" if compute >= self.bytes_accessed / self.chip.hbm_bandwidth else "memory"

    def to_json(self) -> dict[str, Any]:
        chip = self.chip
        return {
            "name": self.name,
            "target": self.target,
            "devices": self.devices,
            "chip": None if chip is None else chip.name,
            "compile_seconds": round(self.compile_seconds, 2),
            "flops": self.flops,
            "bytes_accessed": self.bytes_accessed,
            "memory": {
                "arguments": self.argument_bytes,
                "outputs": self.output_bytes,
                "aliased": self.alias_bytes,
                "temporaries": self.temp_bytes,
                "generated_code": self.code_bytes,
                "total": self.memory_bytes,
                "hbm": None if chip is None else chip.hbm_bytes,
                "fits": self.fits,
            },
            "roofline_seconds": self.roofline_seconds,
            "bound": self.bound,
            "collectives": [dataclasses.asdict(c) for c in self.collectives],
        }

    def summary(self) -> str:
        """A few lines a user reads: memory against HBM, cost, roofline, collectives."""
        gb = 1e9
        lines = [f"{self.name} on {self.target} ({self.devices} device(s); figures per device), "
                 f"compiled in {self.compile_seconds:.1f} s"]
        hbm = "" if self.chip is None else f" of {self.chip.hbm_bytes / GiB:.1f} GiB HBM"
        verdict = {True: " — fits", False: " — DOES NOT FIT", None: ""}[self.fits]
        lines.append(
            f"  memory {self.memory_bytes / GiB:.2f} GiB{hbm}{verdict} (arguments {self.argument_bytes / GiB:.2f}, "
            f"outputs {self.output_bytes / GiB:.2f}, donated {self.alias_bytes / GiB:.2f}, temporaries "
            f"{self.temp_bytes / GiB:.2f}, code {self.code_bytes / 2**20:.1f} MiB)")
        cost = f"  {self.flops / gb:.1f} GFLOP, {self.bytes_accessed / gb:.2f} GB accessed"
        if self.roofline_seconds is not None:
            cost += f", roofline {self.roofline_seconds * 1e3:.2f} ms ({self.bound}-bound)"
        lines.append(cost)
        if self.collectives:
            lines.append("  collectives: " + ", ".join(
                f"{c.kind} x{c.count} ({c.bytes / 2**20:.1f} MiB)" for c in self.collectives))
        return "\n".join(lines)


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = <result type> <opcode>(`; async pairs appear as <opcode>-start / -done: count the start.
_OP = re.compile(r"=\s+(?P<type>\(.*?\)|\S+)\s+(?P<op>[a-z-]+)\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[sufc]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2}


def _array_bytes(type_text: str) -> int:
    total = 0
    for m in _ARRAY.finditer(type_text):
        dtype = m.group("dtype")
        itemsize = _DTYPE_BYTES.get(dtype) or (1 if dtype.startswith("f8") else max(int(dtype[1:]) // 8, 1))
        dims = [int(d) for d in m.group("dims").split(",") if d]
        total += itemsize * int(np.prod(dims, dtype=np.int64))
    return total


def collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Collective ops in compiled HLO text: kind, count and result bytes."""
    counts: dict[str, list[int]] = {}
    for m in _OP.finditer(hlo_text):
        op = m.group("op")
        kind = op.removesuffix("-start")
        if kind not in _COLLECTIVES or op.endswith("-done"):
            continue
        entry = counts.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += _array_bytes(m.group("type"))
    return tuple(Collective(k, n, b) for k, (n, b) in sorted(counts.items()))


def _cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_report(
    fn: Callable[..., Any] | jax.stages.Wrapped,
    *args: Any,
    name: str = "program",
    target: str = "",
    static_kwargs: dict[str, Any] | None = None,
) -> tuple[CompileReport, jax.stages.Compiled]:
    """Lower `fn` (a jitted function, shardings set by the caller) on abstract `args`, compile it,
    and report XLA's figures. `target` is only a label; the devices come from the shardings."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args, **(static_kwargs or {})).compile()
    seconds = time.perf_counter() - start
    cost = _cost(compiled)
    memory = compiled.memory_analysis()
    devices = _devices_of(args)
    report = CompileReport(
        name=name,
        target=target or (devices[0].platform if devices else "?"),
        devices=len(devices),
        compile_seconds=seconds,
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(memory, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(memory, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
        code_bytes=int(getattr(memory, "generated_code_size_in_bytes", 0)),
        collectives=collectives(compiled.as_text()),
        chip=chip_of(devices[0]) if devices else None,
    )
    return report, compiled


def _devices_of(args: Any) -> list[jax.Device]:
    """The devices the arguments' shardings name (the program runs on all of them)."""
    devices: dict[int, jax.Device] = {}
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            for d in sharding.device_set:
                devices[d.id] = d
    return [devices[k] for k in sorted(devices)]


def abstract(tree: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or abstract values) carrying `sharding`:
    one sharding for every leaf, or a matching pytree of shardings."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)


@functools.cache
def single_device(target: str) -> jax.sharding.SingleDeviceSharding:
    """One device of `target` (a single-chip program; `v5e:1x1` is refused by libtpu's default
    host bounds, so take one chip of a 2x2 topology)."""
    return jax.sharding.SingleDeviceSharding(target_devices(target)[0])
