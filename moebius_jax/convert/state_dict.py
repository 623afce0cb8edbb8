"""Flat state dicts (name -> numpy array) from and to the files the reference reads and writes.

`.safetensors` is read with safetensors' numpy backend; torch files (`.bin`, `.pt`, `.pth`,
`.ckpt`, `.tar`) with the torch-free reader in `torch_pickle`. EMA files follow the
reference's `save_litema` layout: {"ema_buffers": decay, num_updates and one shadow per
parameter keyed by its name without dots, "ema_name_map": {parameter name: dot-less name}}.
"""

from __future__ import annotations

import collections
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from moebius_jax.convert.errors import CheckpointError
from moebius_jax.convert.torch_pickle import load_torch_file, save_torch_file
from moebius_jax.io_safety import atomic_output

PathLike = str | os.PathLike

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".tar")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.dtype}{list(value.shape)}"
    if isinstance(value, dict):
        return f"dict with {len(value)} entries"
    return type(value).__name__


def _flat_arrays(obj: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
    """Check that `obj` maps str names to arrays; name every offending entry at once."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, found {_describe(obj)}")
    bad = [f"{k!r}: {_describe(v)}" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        hint = " (an EMA file: use read_ema_file)" if is_ema_file(path) else ""
        raise CheckpointError(
            f"{path}: expected a flat mapping of names to tensors{hint}, but {len(bad)} entr"
            f"{'y is' if len(bad) == 1 else 'ies are'} not: " + "; ".join(bad)
        )
    return obj


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Read a state dict from `.safetensors` or a torch file, unwrapping a `"state_dict"` container.

    Lightning/LDM-style checkpoints keep the weights under `"state_dict"` beside training state.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            # safe_open's numpy framework also covers bf16 (as ml_dtypes.bfloat16).
            with safetensors.safe_open(str(path), framework="numpy") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except safetensors.SafetensorError as e:
            raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from None
    if suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint suffix {suffix!r}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        )
    obj = load_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return _flat_arrays(obj, path)


def is_ema_file(path: PathLike) -> bool:
    """Whether the reference would route `path` to its EMA loader (basename contains `.EMA.`)."""
    return ".EMA." in os.path.basename(os.fspath(path))


@dataclass(frozen=True)
class EmaCheckpoint:
    """EMA shadows keyed by full parameter name (in the file's order), and the EMA counters."""

    params: dict[str, np.ndarray]
    decay: float
    num_updates: int


def _scalar(buffers: Mapping[str, Any], key: str, kind: str, path: pathlib.Path) -> np.ndarray:
    value = buffers.get(key)
    if not (isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in kind):
        raise CheckpointError(
            f"{path}: ema_buffers[{key!r}] must be a one-element tensor of kind {kind!r}, found {_describe(value)}"
        )
    return value.reshape(())


def read_ema_file(path: PathLike) -> EmaCheckpoint:
    """Read an EMA file written by the reference's `save_litema` (layout in the module docstring)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EMA checkpoint not found: {path}")
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a dict with 'ema_buffers' and 'ema_name_map', found {_describe(obj)}"
        )
    for key in ("ema_buffers", "ema_name_map"):
        if not isinstance(obj.get(key), dict):
            found = _describe(obj[key]) if key in obj else "no such key"
            raise CheckpointError(f"{path}: expected a dict under {key!r}, found {found}")
    buffers, name_map = obj["ema_buffers"], obj["ema_name_map"]
    decay = float(_scalar(buffers, "decay", "f", path))
    num_updates = int(_scalar(buffers, "num_updates", "iu", path))

    problems = []
    params: dict[str, np.ndarray] = {}
    for name, sname in name_map.items():
        shadow = buffers.get(sname)
        if not isinstance(shadow, np.ndarray):
            found = _describe(shadow) if sname in buffers else "missing"
            problems.append(f"{name!r} -> ema_buffers[{sname!r}]: {found}")
        else:
            params[name] = shadow
    # The reference loads LitEma strictly, so a shadow no parameter maps to is an error too.
    unused = set(buffers) - {"decay", "num_updates"} - set(name_map.values())
    problems += [f"ema_buffers[{s!r}] is not in ema_name_map" for s in sorted(unused)]
    if problems:
        raise CheckpointError(f"{path}: malformed EMA file, {len(problems)} problem(s): " + "; ".join(problems))
    return EmaCheckpoint(params=params, decay=decay, num_updates=num_updates)


def write_safetensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` as a `.safetensors` file, atomically."""
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # keeps 0-d arrays 0-d
    with atomic_output(path) as tmp:
        safetensors.numpy.save_file(arrays, str(tmp), metadata=dict(metadata) if metadata is not None else None)


def write_ema_file(path: PathLike, params: Mapping[str, np.ndarray], decay: float, num_updates: int) -> None:
    """Write an EMA file in the reference layout, loadable by its `load_removal_model`.

    `params` are the shadows by full parameter name, in `named_parameters()` order; each is
    stored under its name with every "." removed, as LitEma names its buffers.
    """
    buffers: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict(
        decay=np.asarray(decay, dtype=np.float32), num_updates=np.asarray(num_updates, dtype=np.int32)
    )
    name_map: dict[str, str] = {}
    for name, value in params.items():
        sname = name.replace(".", "")
        if sname in buffers:
            raise ValueError(f"{path}: parameter {name!r} and another entry both become EMA buffer {sname!r}")
        buffers[sname] = np.asarray(value)
        name_map[name] = sname
    save_torch_file(path, {"ema_buffers": buffers, "ema_name_map": name_map})
