"""Training checkpoints: orbax CheckpointManager holding the whole train state (params,
BatchNorm statistics, optimiser state, EMA, step, PRNG key) and the data-iterator position.

Saves are asynchronous and keep the last K. Orbax writes each step into a temporary
directory and renames it when complete, so a checkpoint interrupted mid-write is never
listed and a resume takes the last complete one.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str | pathlib.Path, keep: int = 3, save_every: int = 1000):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every, cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = False) -> bool:
        """Start an async save (if due, or forced); returns whether one was started."""
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state (with the shardings of `abstract_state`) and the data position at `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_params(self, step: int | None = None) -> Any:
        """Only the saved tree (numpy on host), e.g. for export; latest step by default."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live tree, as restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
