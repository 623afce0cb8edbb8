"""Compile ahead of time for a target you may not have: fit, cost and collectives of a program.

`python -m bench --target tpu:v5e:2x2`, `train.py --compile-only --topology v5e:4x4`,
`infer.py --compile-only --topology v5e:2x2` and `python -m moebius_jax.inspect_model CONFIG
--target tpu:v5e:2x2` all go through here. A target is

* `tpu:<topology>` (`tpu:v5e:2x2`, `tpu:v5p:2x2x1`, `tpu:v6e:2x2`, `tpu:v5e:4x4` multi-host, ...):
  abstract TPU devices from libtpu (the `tpu` extra), which programs can be lowered and compiled
  for on any host, CPU-only included — compiled, never run;
* `gpu` / `cpu`: this host's devices of that platform.

`compile_report` lowers a jitted function on `jax.ShapeDtypeStruct`s (shardings attached),
compiles it and reads XLA's own figures: per-chip memory (arguments, outputs, temporaries,
generated code) against the chip's HBM, flops and bytes accessed, the roofline time they imply,
and the collectives in the compiled program (kind, count, bytes), so sharding mistakes show.
XLA's "bytes accessed" counts traffic to every memory, on-chip included; on TPU the report also
gives the part in HBM (`hlo_text.memory_traffic`) and the roofline it implies, which is the
tighter bound when XLA keeps activations in on-chip memory.
XLA's cost analysis counts a loop body once whatever its trip count; for single-device
programs each `scan` body is compiled alone and counted once per iteration (`loop_cost`).
XLA's `optimal_seconds` is not used: it is unreliable (negative for the full student). MFU
divides the whole program's flops (lowered, before partitioning) by chips x peak x roofline.
A program that cannot fit is refused with `DoesNotFit`: before compiling when its arguments
alone exceed a chip's HBM, else when XLA:TPU refuses it, else by `CompileReport.check_fits`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import numpy as np

from moebius_jax.errors import UserError
from moebius_jax.hlo_text import Collective, collectives, memory_traffic


def _host_has_tpu() -> bool:
    """Whether TPU chips are attached to this host (PCI scan, as JAX does at start-up)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return True  # unknown: leave libtpu's defaults alone


def _compile_only_libtpu_environment() -> None:
    """On a host without TPU chips libtpu only ever compiles, so let several processes load it
    (otherwise the first JAX process holds /tmp/libtpu_lockfile and a second compile-only job
    fails) and name a worker and an accelerator type, which it would otherwise look up and
    complain about on stderr. Only its runtime reads these; the compiled programs are the same.
    libtpu loads when JAX first starts its backends, so this runs when the module is imported.
    """
    if _host_has_tpu():
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


_compile_only_libtpu_environment()

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """What one device offers: memory, dense peak FLOP/s and memory bandwidth."""

    name: str
    hbm_bytes: int
    peak_flops: float  # bfloat16 (and float16)
    peak_flops_f32: float  # float32 matmuls at JAX's default precision: TF32 on NVIDIA, bf16 passes on TPU
    hbm_bandwidth: float  # bytes/s

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s at a compute dtype ("bfloat16", "float32", ...)."""
        return self.peak_flops_f32 if dtype == "float32" else self.peak_flops

    def roofline(self, flops: float, bytes_accessed: float) -> tuple[float, str]:
        """(seconds, bound): the lower bound flops and bytes set at the bfloat16 peak and the HBM
        bandwidth, max(flops / peak, bytes / bandwidth), and which of the two sets it."""
        compute, memory = flops / self.peak_flops, bytes_accessed / self.hbm_bandwidth
        return max(compute, memory), ("compute" if compute >= memory else "memory")


# Per device as JAX sees it (one chip for these TPUs, whose TensorCores are fused "megacore" or
# single), keyed by a substring of `device_kind`, most specific first. Sources:
# cloud.google.com/tpu/docs/v4, /v5e, /v5p and /v6e ("System architecture": HBM capacity and
# bandwidth, peak bf16 compute); NVIDIA A100, H100 and H200 datasheets (dense, without
# sparsity; TF32 for float32).
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 275e12, 1200e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 918e12, 1640e9),
    "A100-SXM4-40GB": Chip("A100 40GB", 40 * 10**9, 312e12, 156e12, 1555e9),
    "A100": Chip("A100 80GB", 80 * 10**9, 312e12, 156e12, 2039e9),
    "H100 PCIe": Chip("H100 PCIe", 80 * 10**9, 756e12, 378e12, 2.0e12),
    "H100": Chip("H100", 80 * 10**9, 989e12, 494e12, 3.35e12),
    "H200": Chip("H200", 141 * 10**9, 989e12, 494e12, 4.8e12),
}


def chip_for_kind(device_kind: str) -> Chip | None:
    """The facts of a device kind, or None for kinds the table does not know (e.g. CPUs)."""
    return next((chip for pattern, chip in CHIPS.items() if pattern in device_kind), None)


def chip_of(device: jax.Device) -> Chip | None:
    return chip_for_kind(device.device_kind)


def target_devices(target: str) -> list[jax.Device]:
    """Devices for `tpu:<topology>`, `gpu` or `cpu` (see the module docstring)."""
    kind, _, topology = target.partition(":")
    if kind == "tpu" and topology:
        from jax.experimental import topologies

        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
        except Exception as e:  # libtpu missing, or a topology it refuses
            raise UserError(
                f"target {target!r}: no TPU topology {topology!r} ({str(e).splitlines()[0]}); install the "
                "tpu extra (pip install -e '.[tpu]') and use names like v5e:2x2, v5p:2x2x1, v6e:2x2"
            ) from None
    if kind in ("gpu", "cpu", "tpu") and not topology:
        try:
            return list(jax.devices(kind))
        except RuntimeError:
            raise UserError(f"target {target!r}: this host has no {kind} devices") from None
    raise UserError(f"target {target!r}: expected tpu:<topology> (e.g. tpu:v5e:2x2), gpu or cpu")


def topology_target(topology: str) -> str:
    """The target of a `--topology` value: a TPU topology name (`v5e:2x2`) or a target itself
    (`tpu:v5e:2x2`, `gpu`, `cpu`)."""
    return topology if topology in ("gpu", "cpu") or topology.startswith("tpu:") else f"tpu:{topology}"


def target_slug(target: str, devices: Sequence[jax.Device]) -> str:
    """A file-name stem for a target: `tpu:v5e:2x2` -> `tpu-v5e-2x2`, `gpu` on an H200 -> `gpu-nvidia-h200`."""
    kind, _, topology = target.partition(":")
    return "-".join(re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-")
                    for part in (kind, topology or devices[0].device_kind))


def versions() -> dict[str, str | None]:
    """jax, jaxlib and libtpu versions (None when not installed), for report headers."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {package: version(package) for package in ("jax", "jaxlib", "libtpu")}


class DoesNotFit(UserError):
    """A compiled program needs more memory per chip than the target's chips have."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """XLA's figures for one compiled program, per device (an SPMD program is per device)."""

    name: str
    target: str
    devices: int
    device_kind: str
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
    # How loops are costed: "no loops"; "per iteration" (scan bodies compiled alone and counted
    # once per iteration); "body once" (XLA's own count: a multi-device program's loops).
    loop_cost: str = "no loops"
    # The whole program's flops on all devices together, before partitioning (`model_flops`):
    # what MFU divides by. Work the partitioned program repeats on several devices is not in it.
    model_flops: float | None = None
    # Of the traffic, the bytes in device memory (HBM) after XLA:TPU's memory-space assignment
    # (`hlo_text.memory_traffic`; loops counted like `bytes_accessed`). None off TPU, where
    # compiled layouts name no memory spaces.
    hbm_bytes: float | None = None

    @property
    def memory_bytes(self) -> int:
        """Device memory the program needs: live arguments and outputs (donated ones counted once),
        temporaries and the generated code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.chip is None else self.memory_bytes <= self.chip.hbm_bytes

    @property
    def compute_seconds(self) -> float | None:
        return None if self.chip is None else self.flops / self.chip.peak_flops

    @property
    def memory_seconds(self) -> float | None:
        return None if self.chip is None else self.bytes_accessed / self.chip.hbm_bandwidth

    @property
    def roofline_seconds(self) -> float | None:
        """`Chip.roofline`'s time for these flops and bytes (None for chips the table lacks)."""
        return None if self.chip is None else self.chip.roofline(self.flops, self.bytes_accessed)[0]

    @property
    def bound(self) -> str | None:
        return None if self.chip is None else self.chip.roofline(self.flops, self.bytes_accessed)[1]

    @property
    def mfu(self) -> float | None:
        """Model flops / (devices x peak x roofline time): the best MFU these figures allow."""
        return self._mfu(self.roofline_seconds)

    @property
    def hbm_roofline(self) -> tuple[float, str] | None:
        """`Chip.roofline` with only the HBM traffic as memory time: on-chip memory is many
        times faster, so this is the tighter bound on TPU; None where `hbm_bytes` is unknown."""
        if self.chip is None or self.hbm_bytes is None:
            return None
        return self.chip.roofline(self.flops, self.hbm_bytes)

    @property
    def hbm_seconds(self) -> float | None:
        """HBM bytes / HBM bandwidth (None where either is unknown)."""
        return None if self.chip is None or self.hbm_bytes is None else self.hbm_bytes / self.chip.hbm_bandwidth

    def _mfu(self, seconds: float | None) -> float | None:
        if self.chip is None or self.model_flops is None or not seconds:
            return None
        return self.model_flops / (self.devices * self.chip.peak_flops * seconds)

    def check_fits(self) -> None:
        """Raise `DoesNotFit` (a one-line user error naming the per-chip memory and the HBM)
        when the program needs more memory per chip than the chip has."""
        if self.fits is False:
            raise DoesNotFit(
                f"{self.name} does not fit on {self.target}: it needs {self.memory_bytes / GiB:.2f} GiB per chip "
                f"(temporaries {self.temp_bytes / GiB:.2f} GiB), a {self.chip.name} chip has "
                f"{self.chip.hbm_bytes / GiB:.1f} GiB HBM")

    def to_json(self) -> dict[str, Any]:
        chip = self.chip
        return {
            "name": self.name,
            "target": self.target,
            "devices": self.devices,
            "device_kind": self.device_kind,
            "chip": None if chip is None else dataclasses.asdict(chip),
            "compile_seconds": round(self.compile_seconds, 2),
            "flops": self.flops,
            "bytes_accessed": self.bytes_accessed,
            "loop_cost": self.loop_cost,
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
            "compute_seconds": self.compute_seconds,
            "memory_seconds": self.memory_seconds,
            "roofline_seconds": self.roofline_seconds,
            "bound": self.bound,
            "model_flops": self.model_flops,
            "mfu": self.mfu,
            "hbm": None if self.hbm_roofline is None else {
                "bytes": self.hbm_bytes,
                "seconds": self.hbm_seconds,
                "roofline_seconds": self.hbm_roofline[0],
                "bound": self.hbm_roofline[1],
                "mfu": self._mfu(self.hbm_roofline[0]),
            },
            "collectives": [dataclasses.asdict(c) for c in self.collectives],
        }

    def summary(self) -> str:
        """A few lines a user reads: memory against HBM, cost, roofline, collectives."""
        gb = 1e9
        chip = "" if self.chip is None else f" {self.chip.name}"
        lines = [f"{self.name} on {self.target} ({self.devices}{chip} device(s); figures per device), "
                 f"compiled in {self.compile_seconds:.1f} s"]
        hbm = "" if self.chip is None else f" of {self.chip.hbm_bytes / GiB:.1f} GiB HBM"
        verdict = {True: " — fits", False: " — DOES NOT FIT", None: ""}[self.fits]
        lines.append(
            f"  memory {self.memory_bytes / GiB:.2f} GiB{hbm}{verdict} (arguments {self.argument_bytes / GiB:.2f}, "
            f"outputs {self.output_bytes / GiB:.2f}, donated {self.alias_bytes / GiB:.2f}, temporaries "
            f"{self.temp_bytes / GiB:.2f}, code {self.code_bytes / 2**20:.1f} MiB)")
        loops = {"no loops": "", "per iteration": " (loops counted per iteration)",
                 "body once": " (each loop body counted once)"}[self.loop_cost]
        cost = f"  {self.flops / gb:.1f} GFLOP, {self.bytes_accessed / gb:.2f} GB accessed{loops}"
        if self.roofline_seconds is not None:
            cost += (f"; roofline {self.roofline_seconds * 1e3:.2f} ms, {self.bound}-bound "
                     f"(compute {self.compute_seconds * 1e3:.2f} ms, memory {self.memory_seconds * 1e3:.2f} ms)")
        lines.append(cost)
        if self.hbm_roofline is not None:
            seconds, bound = self.hbm_roofline
            lines.append(f"  of which in HBM {self.hbm_bytes / gb:.2f} GB (the rest in on-chip memory): "
                         f"HBM roofline {seconds * 1e3:.2f} ms, {bound}-bound "
                         f"(memory {self.hbm_seconds * 1e3:.2f} ms)")
        if self.mfu is not None:
            lines.append(f"  model {self.model_flops / gb:.1f} GFLOP on all {self.devices} device(s): "
                         f"MFU at most {100 * self.mfu:.1f}% (model flops / (devices x peak x roofline))")
        if self.collectives:
            lines.append("  collectives: " + ", ".join(
                f"{c.kind} x{c.count} ({c.bytes / 2**20:.1f} MiB)" for c in self.collectives))
        return "\n".join(lines)


def xla_cost(compiled: jax.stages.Compiled | jax.stages.Lowered) -> dict[str, float]:
    """XLA's cost analysis as one dict (older JAX returned one per program)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def loop_correction(jaxpr: jex.core.Jaxpr, body_cost: Callable[[jex.core.ClosedJaxpr], Any]) -> Any:
    """What XLA's cost analysis leaves out of a program: it costs a loop body once whatever the
    trip count, so each scan adds (length - 1) more bodies, nested scans included. `body_cost`
    costs one body run once (a float, or an array of figures)."""
    extra = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body, length = eqn.params["jaxpr"], eqn.params["length"]
            extra = extra + (length - 1) * body_cost(body) + length * loop_correction(body.jaxpr, body_cost)
        else:
            for sub in jex.core.jaxprs_in_params(eqn.params):
                extra = extra + loop_correction(sub, body_cost)
    return extra


def _has_scan(jaxpr: jex.core.Jaxpr) -> bool:
    return any(eqn.primitive.name == "scan" or any(_has_scan(s) for s in jex.core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def _figures(compiled: jax.stages.Compiled, hlo_text: str) -> np.ndarray:
    """(flops, bytes accessed, HBM bytes) of a compiled program and its text (HBM: NaN off TPU)."""
    cost = xla_cost(compiled)
    on_tpu = _devices_of((compiled.input_shardings, compiled.output_shardings))[0].platform == "tpu"
    hbm = memory_traffic(hlo_text).device_bytes if on_tpu else np.nan
    return np.array([cost.get("flops", 0.0), cost.get("bytes accessed", 0.0), hbm])


def _compiled_body_cost(device: jax.Device) -> Callable[[jex.core.ClosedJaxpr], np.ndarray]:
    """`_figures` of a loop body compiled alone for `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)

    def cost(body: jex.core.ClosedJaxpr) -> np.ndarray:
        args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, sharding=sharding) for v in body.jaxpr.invars]
        compiled = jax.jit(jex.core.jaxpr_as_fun(body)).lower(*args).compile()
        return _figures(compiled, compiled.as_text())

    return cost


def _lowered_flops(closed: jex.core.ClosedJaxpr) -> float:
    """XLA's flop count of a jaxpr lowered (not compiled) for this host's CPU: the program as
    written, unpartitioned (a TPU topology's lowered programs carry no cost analysis)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = [jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=cpu) for aval in closed.in_avals]
    return float(xla_cost(jax.jit(jex.core.jaxpr_as_fun(closed)).lower(*args)).get("flops", 0.0))


def model_flops(traced: jax.stages.Traced) -> float:
    """The flops of a whole traced program on all its devices together, loops counted per
    iteration (what MFU divides by)."""
    closed = traced.jaxpr
    return _lowered_flops(closed) + loop_correction(closed.jaxpr, _lowered_flops)


def _compile_uncached(traced: jax.stages.Traced) -> jax.stages.Compiled:
    """Lower and compile without writing to JAX's persistent compilation cache: a compile-only
    TPU executable can be written there but never read back (every later lookup warns), and a
    report's compile seconds are the compiler's, not a cache lookup's."""
    option = "jax_persistent_cache_min_compile_time_secs"
    previous = getattr(jax.config, option)
    jax.config.update(option, float("inf"))
    try:
        return traced.lower().compile()
    finally:
        jax.config.update(option, previous)


def compile_traced(traced: jax.stages.Traced, *, name: str = "program", target: str = ""
                   ) -> tuple[CompileReport, jax.stages.Compiled]:
    """Compile a traced program (abstract arguments with shardings: they name the devices) and
    report XLA's figures. `target` is only a label. A program the compiler refuses for lack of
    device memory raises `DoesNotFit`; one it accepts may still report `fits` False."""
    start = time.perf_counter()
    try:
        compiled = _compile_uncached(traced)
    except jax.errors.JaxRuntimeError as e:
        # XLA:TPU refuses, at compile time, a program whose buffers exceed the chip's HBM.
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        reason = str(e).removeprefix("RESOURCE_EXHAUSTED:").strip().splitlines()[0]
        raise DoesNotFit(f"{name} does not fit on {target or 'the target'}: {reason}") from None
    seconds = time.perf_counter() - start
    devices = _devices_of((compiled.input_shardings, compiled.output_shardings))
    hlo_text = compiled.as_text()
    figures = _figures(compiled, hlo_text)
    loop_cost = "no loops"
    if _has_scan(traced.jaxpr.jaxpr):
        if len(devices) == 1:
            figures = figures + loop_correction(traced.jaxpr.jaxpr, _compiled_body_cost(devices[0]))
            loop_cost = "per iteration"
        else:
            loop_cost = "body once"
    memory = compiled.memory_analysis()
    report = CompileReport(
        name=name,
        target=target or devices[0].platform,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        compile_seconds=seconds,
        flops=float(figures[0]),
        bytes_accessed=float(figures[1]),
        argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(memory, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(memory, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
        code_bytes=int(getattr(memory, "generated_code_size_in_bytes", 0)),
        collectives=collectives(hlo_text),
        chip=chip_of(devices[0]),
        loop_cost=loop_cost,
        model_flops=model_flops(traced),
        hbm_bytes=None if np.isnan(figures[2]) else float(figures[2]),
    )
    return report, compiled


def check_arguments_fit(args: Any, *, name: str = "program", target: str = "") -> None:
    """Raise `DoesNotFit` before compiling (minutes saved) when the arguments alone — abstract
    values with shardings — need more memory on some chip than it has. Leaves without a
    sharding, and chips the table lacks, are not checked."""
    per_device: dict[int, int] = {}
    chips: dict[int, Chip | None] = {}
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            continue
        nbytes = int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            per_device[device.id] = per_device.get(device.id, 0) + nbytes
            chips.setdefault(device.id, chip_of(device))
    for device_id, used in per_device.items():
        chip = chips[device_id]
        if chip is not None and used > chip.hbm_bytes:
            raise DoesNotFit(f"{name} does not fit on {target or 'the target'}: its arguments alone need "
                             f"{used / GiB:.2f} GiB per chip, a {chip.name} chip has {chip.hbm_bytes / GiB:.1f} GiB "
                             "HBM (nothing was compiled)")


def compile_report(
    fn: Callable[..., Any] | jax.stages.Wrapped,
    *args: Any,
    name: str = "program",
    target: str = "",
    static_kwargs: dict[str, Any] | None = None,
) -> tuple[CompileReport, jax.stages.Compiled]:
    """Trace `fn` (jitted or not; shardings set on the abstract `args` by the caller), compile
    it and report XLA's figures (see `compile_traced`; `check_arguments_fit` first)."""
    check_arguments_fit(args, name=name, target=target)
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    return compile_traced(jitted.trace(*args, **(static_kwargs or {})), name=name, target=target)


def _devices_of(shardings: Any) -> list[jax.Device]:
    """The devices a program's shardings name (it runs on all of them)."""
    devices = {d.id: d for s in jax.tree.leaves(shardings) for d in s.device_set}
    return [devices[k] for k in sorted(devices)]


def abstract(tree: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves (arrays or abstract values) carrying `sharding`:
    one sharding for every leaf, or a matching pytree of shardings. Abstract leaves that
    already carry a sharding keep it."""
    def one(x: Any, s: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
        own = getattr(x, "sharding", None) if isinstance(x, jax.ShapeDtypeStruct) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=own or s)

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, sharding), tree)
    return jax.tree.map(one, tree, sharding)


@functools.cache
def single_device(target: str) -> jax.sharding.SingleDeviceSharding:
    """One device of `target` (a single-chip program; `v5e:1x1` is refused by libtpu's default
    host bounds, so take one chip of a 2x2 topology)."""
    return jax.sharding.SingleDeviceSharding(target_devices(target)[0])
