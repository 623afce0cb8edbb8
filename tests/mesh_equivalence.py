"""Subprocess helper for tests/test_mesh.py (the host device count must be set before JAX starts).

1. Trainer: 3 steps (AdamW at 1e-4: it compiles in half Muon's time, and Muon's own
   sharding is plain GSPMD over its Newton-Schulz matmuls) on 1 device vs an 8-device
   (data 4 x fsdp 2) mesh: losses and parameters; and one distillation step (tiny teacher)
   on the mesh.
2. Gradients: the tiny student's train-mode gradient with the batch and parameters sharded
   over the mesh vs on one device, next to two yardsticks. The float32 noise floor: the same
   gradient on one device with the batch permuted (four permutations). The randomly
   initialised student amplifies gradients ~200x from its output to its input layers, and the
   rounding with them, so merely reordering the batch sums moves the first layers' gradients by
   up to ~6e-3 of the gradient's scale (most permutations; an occasional one by 1e-4). And what
   a sharding bug looks like: BatchNorm statistics taken per half of the batch instead of over
   the global batch (what data parallelism without cross-device statistics computes), which
   moves the gradient by O(1). "Equal" for a gradient means within the noise floor, and the
   bug far outside it.

Prints one JSON line.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebius_jax.loading import load_model  # noqa: E402
from moebius_jax.train.config import MeshConfig, load_train_config  # noqa: E402
from moebius_jax.train.loop import Trainer  # noqa: E402
from moebius_jax.train.mesh import batch_sharding, make_mesh, tree_shardings  # noqa: E402

BASE = ["data.image_size=64", "data.mask_config=random_medium_256", "data.batch_size=8", "data.num_workers=0",
        "dtype=float32", "sample_every=0", "optimizer.learning_rate=1e-4", "optimizer.warmup_steps=0"]
MESH = ["mesh.data=4", "mesh.fsdp=2"]
ADAMW = ["optimizer.name=adamw"]


def train(mesh_overrides, config_file="train_demo.yaml", steps=3):
    config = load_train_config(ROOT / "configs" / config_file, BASE + mesh_overrides)
    trainer = Trainer.build(config, "/nonexistent")
    data = trainer._data_iterator()
    state, losses = trainer.state, []
    sharded = sum(any(x.sharding.spec) for x in jax.tree.leaves(state))  # initialised in its shardings
    for _ in range(steps):
        state, metrics = trainer.step_fn(state, trainer.frozen, trainer._to_global(next(data)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), sharded


def gradient_differences():
    """max |g_other - g_one_device| / max |g_one_device| for four permuted batches, for the mesh,
    and for per-half BatchNorm statistics (a sharding bug, on one device)."""
    model, variables = load_model(ROOT / "configs" / "moebius_tiny.yaml", seed=0)
    rng = np.random.default_rng(0)
    b, side = 8, 8
    x = rng.standard_normal((b, side, side, 9)).astype(np.float32)
    x[..., 4] = rng.uniform(size=(b, side, side)) < 0.4  # the latent-mask channel is binary
    t = rng.integers(0, 1000, b).astype(np.int32)
    ids = np.tile(np.arange(model.config.context_length, dtype=np.int32), (b, 1))
    target = rng.standard_normal((b, side, side, 4)).astype(np.float32)

    def loss(params, x, t, ids, target):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, t, ids,
                             train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out.sample - target))

    def per_half_statistics_loss(params, x, t, ids, target):
        h = x.shape[0] // 2
        return (loss(params, x[:h], t[:h], ids[:h], target[:h]) + loss(params, x[h:], t[h:], ids[h:], target[h:])) / 2

    grad = jax.jit(jax.grad(loss))
    reference = grad(variables["params"], x, t, ids, target)
    permuted = [grad(variables["params"], x[p], t[p], ids[p], target[p]) for p in (rng.permutation(b) for _ in range(4))]
    per_half = jax.jit(jax.grad(per_half_statistics_loss))(variables["params"], x, t, ids, target)
    mesh = make_mesh(4, 2, jax.devices())
    params = jax.device_put(variables["params"], tree_shardings(variables["params"], mesh, MeshConfig().rules))
    sharded = grad(params, *(jax.device_put(a, batch_sharding(mesh)) for a in (x, t, ids, target)))
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(reference))

    def distance(other):
        return max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in
                   zip(jax.tree.leaves(reference), jax.tree.leaves(other))) / scale

    return [distance(p) for p in permuted], distance(sharded), distance(per_half)


single_losses, single_params, _ = train(["mesh.num_devices=1", "mesh.data=1", "mesh.fsdp=1", *ADAMW])
mesh_losses, mesh_params, sharded_leaves = train(MESH + ADAMW)
param_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(mesh_params)))
distill_losses, _, _ = train(MESH + ADAMW, "distill_demo.yaml", steps=1)
permuted, sharded, per_half = gradient_differences()
print(json.dumps({"devices": jax.device_count(), "single_losses": single_losses, "mesh_losses": mesh_losses,
                  "sharded_state_leaves": sharded_leaves,
                  "max_param_diff": param_diff, "distill_losses": distill_losses,
                  "grad_diff_permuted": permuted, "grad_diff_mesh": sharded,
                  "grad_diff_per_half_statistics": per_half}))
