"""Subprocess helper for test_train: 3 steps on 1 device vs an 8-device (data 4, fsdp 2) mesh,
and one distillation step (tiny teacher) on the mesh.

Prints one JSON line: the per-step losses of the runs and the largest parameter difference.
"""

import json
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebius_jax.train.config import load_train_config  # noqa: E402
from moebius_jax.train.loop import Trainer  # noqa: E402

# AdamW: Muon's bfloat16 Newton-Schulz (the reference's) turns 1-ulp float32 differences of a
# reordered reduction into bf16 rounding flips, so its runs agree only to ~1e-4 after three
# steps on ANY two reduction orders; AdamW shows what the mesh itself changes.
BASE = ["data.image_size=64", "data.mask_config=random_medium_256", "data.batch_size=8", "data.num_workers=0",
        "dtype=float32", "sample_every=0", "optimizer.name=adamw"]


def run(mesh_overrides, config_file="train_demo.yaml", steps=3):
    config = load_train_config(ROOT / "configs" / config_file, BASE + mesh_overrides)
    trainer = Trainer.build(config, "/nonexistent")
    data = trainer._data_iterator()
    state, losses = trainer.state, []
    for _ in range(steps):
        state, metrics = trainer.step_fn(state, trainer.frozen, trainer._to_global(next(data)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


single_losses, single_params = run(["mesh.num_devices=1", "mesh.data=1", "mesh.fsdp=1"])
mesh_losses, mesh_params = run(["mesh.data=4", "mesh.fsdp=2"])
distill_losses, _ = run(["mesh.data=4", "mesh.fsdp=2"], "distill_demo.yaml", steps=1)
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(mesh_params)))
print(json.dumps({"devices": jax.device_count(), "single_losses": single_losses, "mesh_losses": mesh_losses,
                  "max_param_diff": diff, "distill_losses": distill_losses}))
