"""The distillation objective against one recorded reference step (distill_step fixture)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import assert_parity, load_npz, nchw_to_nhwc

from moebius_jax.convert.keymap import to_torch
from moebius_jax.convert.maps import UNET_KEYMAP
from moebius_jax.train.config import LossConfig
from moebius_jax.train.objective import Targets, objective, probe_paths


@pytest.fixture(scope="module")
def step():
    return load_npz("distill_step", "step.npz")


@pytest.fixture(scope="module")
def result(step, tiny_student):
    model, variables = tiny_student
    x = nchw_to_nhwc(step["latent_model_input"])

    def forward(params):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, step["timesteps"], step["input_ids"], train=True, mutable=["batch_stats"])
        return (out.sample, out.block_outputs[2]), updates["batch_stats"]

    targets = Targets(noise=nchw_to_nhwc(step["noise"]),
                      teacher_sample=nchw_to_nhwc(step["teacher_out_sample"]),
                      teacher_feature=nchw_to_nhwc(step["teacher_feat"]))
    run = jax.jit(lambda p: objective(forward, p, targets, LossConfig(), probe_paths(model.config)))
    return run(variables["params"])


@pytest.mark.parametrize("name, ref", [
    ("loss_featkd", "loss_featkd"), ("loss_outkd", "loss_outkd"), ("loss_task", "loss_task"),
    ("gnorm_feature_featkd", "feat_gnorm_featkd"), ("gnorm_feature_task", "feat_gnorm_task"),
    ("gnorm_feature_outkd", "feat_gnorm_outkd"), ("gnorm_output_task", "out_gnorm_task"),
    ("gnorm_output_outkd", "out_gnorm_outkd"), ("weight_feat_task", "feat_weight_task"),
    ("weight_out_outkd", "out_weight_outkd"), ("loss", "loss"),
])
def test_scalars(result, step, name, ref):
    metrics = result[3]
    np.testing.assert_allclose(float(metrics[name]), float(step[ref]), rtol=1e-4)


def test_gradients_of_the_total_loss(result, step):
    _, grads, _, _ = result
    torch_grads = to_torch({"params": grads}, UNET_KEYMAP)
    for key in step["grad_keys"]:
        assert_parity(torch_grads[str(key)], step[f"grad:{key}"], name=str(key))
    # On the host: eager jnp ops would compile a square and a sum per leaf shape.
    total = float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(total, float(step["grad_total_norm"]), rtol=1e-4)


def test_batch_norm_statistics_after_the_step(result, step):
    stats = result[2]["diff_model"]["conv_in"]["bn1"]
    assert_parity(stats["mean"], step["bn_after_running_mean"], name="running_mean")
    assert_parity(stats["var"], step["bn_after_running_var"], name="running_var")
    assert int(stats["count"]) == int(step["bn_after_num_batches_tracked"]) == 1
