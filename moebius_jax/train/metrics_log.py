"""Where training metrics and sample images go: metrics.jsonl, TensorBoard events, PNG grids."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np
from PIL import Image


class MetricsWriter:
    """Appends one JSON object per logged step to workdir/metrics.jsonl and mirrors it to
    TensorBoard (workdir/tensorboard). Only the first process writes."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step":
                self._tb.add_scalar(name, value, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the restored step so the log has no duplicates."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in lines))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def save_sample_grid(path: pathlib.Path, masked: np.ndarray, output: np.ndarray, target: np.ndarray) -> None:
    """Rows of (masked input | output | target); arrays (B, H, W, 3) in [0, 1]."""
    rows = np.concatenate([masked, output, target], axis=2)
    grid = np.concatenate(list(rows), axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8)).save(path)
