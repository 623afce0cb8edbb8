"""Our own checkpoint format: an orbax directory holding the Flax variables.

Layout of a converted model directory:
    DIR/variables/   orbax StandardCheckpointer tree {"params": ..., "batch_stats": ...}
    DIR/config.yaml  the reference-style model config the variables belong to (optional)
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

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
    """Write `variables` (and the raw config dict) under `directory`; returns the directory."""
    directory = pathlib.Path(directory).absolute()
    target = directory / VARIABLES_DIR
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        shutil.rmtree(target)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, dict(variables))
    checkpointer.wait_until_finished()
    if config is not None:
        with open(directory / CONFIG_FILE, "w") as f:
            yaml.safe_dump(dict(config), f, sort_keys=False)
    return directory


def restore_variables(directory: str | os.PathLike, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Read variables saved by `save_variables`, checked against the model's abstract tree."""
    directory = pathlib.Path(directory).absolute()
    target = directory / VARIABLES_DIR
    if not target.is_dir():
        raise FileNotFoundError(f"{directory} is not a moebius-jax checkpoint (no {VARIABLES_DIR}/)")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dict(abstract))
    return ocp.StandardCheckpointer().restore(target, abstract)
