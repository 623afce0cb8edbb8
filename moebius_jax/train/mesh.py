"""Device mesh and sharding rules: the same script on one CPU, a GPU or a TPU slice.

The mesh has two axes. `data` replicates parameters and splits the batch; `fsdp` also splits
the batch and additionally shards every parameter (and its optimiser moments) along its
largest dimension that divides evenly — ZeRO-3 style, chosen by shape so new layers need no
rule. BatchNorm statistics are computed over the global batch, so results do not depend on
how the batch is split over devices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """(data, fsdp) mesh over all (or the given) devices; data = -1 takes what fsdp leaves."""
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over both mesh axes."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**12) -> PartitionSpec:
    """Shard the largest dimension divisible by `fsdp`; small or indivisible arrays stay whole."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of a (possibly abstract) train state, by the fsdp rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_state)
