"""Our own checkpoint format: an orbax directory holding the Flax variables.

Layout of a converted model directory:
    DIR/variables/   orbax StandardCheckpointer tree {"params": ..., "batch_stats": ...}
    DIR/config.yaml  the reference-style model config the variables belong to (optional)
"""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from moebius_jax.io_safety import atomic_output

VARIABLES_DIR = "variables"
CONFIG_FILE = "config.yaml"


def is_orbax_dir(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / VARIABLES_DIR).is_dir()


def save_variables(
    directory: str | os.PathLike,
    variables: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write `variables` (and the raw config dict) under `directory`; returns the directory.
    An existing output is replaced only once the new one is complete."""
    directory = pathlib.Path(directory).absolute()
    target = directory / VARIABLES_DIR
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    fresh, old = (directory / f".{VARIABLES_DIR}.{secrets.token_hex(6)}.{kind}" for kind in ("new", "old"))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(fresh, dict(variables))
        checkpointer.wait_until_finished()
        if target.exists():
            target.rename(old)
        fresh.rename(target)
    finally:
        for leftover in (fresh, old):
            shutil.rmtree(leftover, ignore_errors=True)
    if config is not None:
        with atomic_output(directory / CONFIG_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return directory


def restore_variables(directory: str | os.PathLike, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Read variables saved by `save_variables`, checked against the model's abstract tree."""
    directory = pathlib.Path(directory).absolute()
    target = directory / VARIABLES_DIR
    if not target.is_dir():
        raise FileNotFoundError(f"{directory} is not a moebius-jax checkpoint (no {VARIABLES_DIR}/)")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dict(abstract))
    return ocp.StandardCheckpointer().restore(target, abstract)
