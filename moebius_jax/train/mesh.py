"""Device mesh and sharding rules: the same script on one CPU, a GPU or a TPU slice.

The mesh has two axes, built by `jax.make_mesh` (which orders the devices by the physical
topology, e.g. into rings on TPUs). `data` replicates parameters and splits the batch; `fsdp`
also splits the batch and may shard parameters. Which array is sharded how is data: a list of
`(regex, spec)` rules (`MeshConfig.rules`), the first rule whose regex is found in an array's
path (`params/diff_model/conv_in/kernel`, `opt_state/...`, `teacher/params/...`) deciding.
A spec is

* `"fsdp"`: the largest dimension that `fsdp` divides is sharded over it (arrays under 4096
  elements, or with no such dimension, stay whole): ZeRO-3 style, chosen by shape so that new
  layers need no rule;
* `"replicate"`: a full copy on every device;
* a list with one entry per leading dimension: `null`, a mesh axis or a list of mesh axes,
  as in a `PartitionSpec` (`[null, null, null, fsdp]` shards a conv kernel's output channels).

The default, `[[".*", "fsdp"]]`, applies the fsdp rule to everything. Optimiser moments and
EMA shadows have their parameter's shape, so by-shape rules shard them alike. BatchNorm
statistics are computed over the global batch, so results do not depend on the mesh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moebius_jax.errors import ConfigError

if TYPE_CHECKING:
    from moebius_jax.train.config import MeshConfig

DATA_AXES = ("data", "fsdp")
FSDP, REPLICATE = "fsdp", "replicate"
FSDP_MIN_SIZE = 2**12  # smaller arrays are not worth a collective


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """(data, fsdp) mesh over all (or the given) devices; data = -1 takes what fsdp leaves.

    `devices` may be any device list, including abstract ones (e.g. from
    `jax.experimental.topologies`) for compiling without the hardware.
    """
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(f"{fsdp} does not divide the {len(devices)} devices", field=("mesh", "fsdp"))
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ConfigError(f"{data} x mesh.fsdp {fsdp} != {len(devices)} devices", field=("mesh", "data"))
    # Auto axes: shardings are propagated by the compiler (GSPMD), not part of array types.
    return jax.make_mesh((data, fsdp), DATA_AXES, (AxisType.Auto,) * 2, devices=devices)


def mesh_from_config(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh `config` describes, over the first `config.num_devices` of `devices` (default:
    all of JAX's devices; -1: all of them)."""
    devices = list(devices if devices is not None else jax.devices())
    if config.num_devices != -1:
        if not 1 <= config.num_devices <= len(devices):
            raise ConfigError(f"expected -1 or 1..{len(devices)}, got {config.num_devices}",
                              field=("mesh", "num_devices"))
        devices = devices[:config.num_devices]
    return make_mesh(config.data, config.fsdp, devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
    """Shard the largest dimension divisible by `fsdp`; small or indivisible arrays stay whole."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def check_rules(rules: Sequence[Any], axis_names: Sequence[str] = DATA_AXES) -> tuple[tuple[str, Any], ...]:
    """Validate `mesh.rules` (pairs of a regex and a spec, see the module docstring)."""
    checked = []
    for i, rule in enumerate(rules):
        where = ("mesh", "rules", i)
        if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise ConfigError(f"expected a [regex, spec] pair, got {rule!r}", field=where)
        pattern, spec = rule
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"{pattern!r} is not a regular expression ({e})", field=where) from None
        if isinstance(spec, str):
            if spec not in (FSDP, REPLICATE):
                raise ConfigError(f"spec {spec!r} is not {FSDP!r}, {REPLICATE!r} or a list of axes", field=where)
        elif isinstance(spec, Sequence):
            for entry in spec:
                axes = entry if isinstance(entry, Sequence) and not isinstance(entry, str) else [entry]
                unknown = [a for a in axes if a is not None and a not in axis_names]
                if unknown:
                    raise ConfigError(f"unknown mesh axis {unknown[0]!r} in {spec!r} (axes: {list(axis_names)})",
                                      field=where)
            spec = tuple(tuple(e) if isinstance(e, Sequence) and not isinstance(e, str) else e for e in spec)
        else:
            raise ConfigError(f"spec {spec!r} is not {FSDP!r}, {REPLICATE!r} or a list of axes", field=where)
        checked.append((pattern, spec))
    return tuple(checked)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Sequence[Any]) -> PartitionSpec:
    """The spec of the array at `path` by the first matching rule (replicated when none does);
    `rules` as `check_rules` returns them."""
    for i, (pattern, spec) in enumerate(rules):
        if not re.search(pattern, path):
            continue
        if spec == FSDP:
            return fsdp_spec(shape, mesh.shape["fsdp"])
        if spec == REPLICATE:
            return PartitionSpec()
        where = ("mesh", "rules", i)
        if len(spec) > len(shape):
            raise ConfigError(f"{pattern!r}: {list(spec)} has {len(spec)} entries but {path} has shape {shape}",
                              field=where)
        for dim, entry in enumerate(spec):
            axes = entry if isinstance(entry, tuple) else (entry,)
            size = math.prod(mesh.shape[a] for a in axes if a is not None)
            if shape[dim] % size:
                raise ConfigError(f"{pattern!r}: {list(spec)}: dimension {dim} of {path} (shape {shape}) is "
                                  f"{shape[dim]}, not divisible by {size} devices", field=where)
        return PartitionSpec(*spec)
    return PartitionSpec()


def path_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as rules see it: `params/diff_model/conv_in/kernel`."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Any]) -> Any:
    """A NamedSharding per leaf of a (possibly abstract) pytree, by the rules."""
    rules = check_rules(rules, mesh.axis_names)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(path_name(path), tuple(np.shape(x)), mesh, rules)), tree)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying `shardings` (what `jit(...).lower` wants)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def describe_shardings(tree: Any, shardings: Any, prefix: str = "") -> list[str]:
    """One line per leaf: path (after `prefix`), shape, dtype and PartitionSpec; then bytes per device."""
    lines, per_device = [], 0
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, x), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
        shape = tuple(x.shape)
        lines.append(f"{prefix}{path_name(path)}  {shape}  {np.dtype(x.dtype).name}  {sharding.spec}")
        shard = sharding.shard_shape(shape)
        per_device += math.prod(shard) * np.dtype(x.dtype).itemsize
    lines.append(f"{len(flat)} arrays, {per_device / 2**20:.1f} MiB per device")
    return lines
