"""The Moebius training objective: task loss, output and feature distillation, an optional
extra latent-space term (E-LatentLPIPS), and the reference's gradient-norm adaptive weights.

Adaptive weighting needs each raw loss's gradient at two probe kernels (`probe_paths`). We
linearise the student once (`jax.vjp`: one forward pass), pull each loss's output cotangent
back keeping only the probe gradients (activation backward only: XLA removes the unused
weight gradients), then, the weights being constants, pull back the weighted sum of the
cotangents once for the full gradient. The reference instead re-runs forward segments for
every probe (gradient checkpointing) and keeps separate graphs per loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moebius_jax.config import UNetConfig
from moebius_jax.train.config import LossConfig

# (eps, max) of the reference's three adaptive weights.
OUT_WEIGHT = (1e-6, 1e6)
EXTRA_WEIGHT = (1e-6, 1e6)
FEAT_WEIGHT = (1e-4, 1e4)


def mse(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def probe_paths(config: UNetConfig) -> dict[str, tuple[str, ...]]:
    """Flax paths (inside `params`) of the two probe kernels.

    feature: proj_out of the last transformer of the deepest down block (what produces the
    distilled feature); output: the last pointwise kernel of conv_out.
    """
    deepest = len(config.levels) - 1
    last = config.layers_per_block - 1
    feature = ("diff_model", f"down_blocks_{deepest}", f"attentions_{last}", "proj_out", "kernel")
    output = ("diff_model", "conv_out", "conv_pw", "kernel") if config.conv_kind == "dwsep" \
        else ("diff_model", "conv_out", "kernel")
    return {"feature": feature, "output": output}


@dataclasses.dataclass(frozen=True)
class Targets:
    """What the losses compare against. Teacher fields are None without a teacher."""

    noise: jnp.ndarray
    teacher_sample: jnp.ndarray | None = None
    teacher_feature: jnp.ndarray | None = None


# An extra latent-space loss as a training run configures it (E-LatentLPIPS):
# (its frozen network, predicted x0 latents, target x0 latents, key) -> scalar.
ExtraLoss = Callable[[Any, jnp.ndarray, jnp.ndarray, jax.Array], jnp.ndarray]
# The same term as `objective` takes it, everything but the student bound:
# (student noise prediction (B,h,w,c), key) -> scalar.
ExtraTerm = Callable[[jnp.ndarray, jax.Array], jnp.ndarray]


def _leaf(tree: Any, path: tuple[str, ...]) -> jnp.ndarray:
    for key in path:
        tree = tree[key]
    return tree


def _weight(numerator, denominator, bounds):
    eps, cap = bounds
    return jax.lax.stop_gradient(jnp.clip(numerator / (denominator + eps), 0.0, cap))


def objective(
    forward: Callable[[Any], tuple[tuple[jnp.ndarray, jnp.ndarray], Any]],
    params: Any,
    targets: Targets,
    config: LossConfig,
    probes: Mapping[str, tuple[str, ...]],
    extra_loss: ExtraTerm | None = None,
    key: jax.Array | None = None,
) -> tuple[jnp.ndarray, Any, Any, dict[str, jnp.ndarray]]:
    """(total loss, gradient w.r.t. params, forward aux (BatchNorm updates), metrics).

    `forward(params) -> ((noise prediction, distilled feature), aux)` is the student in train
    mode. Without a teacher the loss is the plain task MSE.
    """
    (sample, feature), vjp, aux = jax.vjp(forward, params, has_aux=True)
    zeros_s, zeros_f = jnp.zeros_like(sample), jnp.zeros_like(feature)

    def loss_term(fn, on_feature=False):
        value, grad = jax.value_and_grad(fn)(feature if on_feature else sample)
        return value, (zeros_s, grad) if on_feature else (grad, zeros_f)

    terms = {"task": loss_term(lambda s: mse(s, targets.noise))}
    distill = targets.teacher_sample is not None
    if distill:
        terms["outkd"] = loss_term(lambda s: mse(s, targets.teacher_sample))
        terms["featkd"] = loss_term(lambda f: config.feat_weight * mse(f, targets.teacher_feature), True)
    if extra_loss is not None:
        terms["extra"] = loss_term(lambda s: extra_loss(s, key))
    values = {name: v for name, (v, _) in terms.items()}

    names = list(terms)
    if names == ["task"]:  # no teacher, no extra term: the plain diffusion loss
        coeffs, metrics = {"task": jnp.float32(1.0)}, {}
    elif not config.adaptive:
        static = {"task": config.task_weight, "outkd": config.kd_weight, "featkd": config.kd_weight,
                  "extra": config.elatentlpips.weight}
        coeffs = {n: jnp.float32(static[n]) for n in names}
        metrics = {}
    else:
        # Each raw loss's gradient at the two probes: one backward pass per loss, of which only
        # the probes are kept (XLA drops every other weight gradient inside the loop body).
        stacked = jax.tree.map(lambda *cs: jnp.stack(cs), *[terms[n][1] for n in names])
        probe_grads = jax.lax.map(
            lambda c: {probe: _leaf(vjp(c)[0], path) for probe, path in probes.items()}, stacked)
        norms = {(probe, n): jnp.linalg.norm(g[i].astype(jnp.float32).ravel())
                 for probe, g in probe_grads.items() for i, n in enumerate(names)}
        task_o = norms["output", "task"]
        coeffs, metrics = {}, {}
        w_ft = _weight(norms["feature", "featkd"], norms["feature", "task"], FEAT_WEIGHT) if distill else 1.0
        coeffs["task"] = w_ft * config.task_weight
        if distill:
            w_out = _weight(task_o, norms["output", "outkd"], OUT_WEIGHT)
            coeffs["featkd"] = jnp.float32(config.kd_weight)
            coeffs["outkd"] = w_ft * config.kd_weight * w_out
            metrics.update(weight_feat_task=w_ft, weight_out_outkd=w_out)
        if "extra" in terms:
            w_el = _weight(task_o, norms["output", "extra"], EXTRA_WEIGHT)
            coeffs["extra"] = w_ft * config.elatentlpips.weight * w_el
            metrics["weight_out_extra"] = w_el
        metrics.update({f"gnorm_{probe}_{n}": v for (probe, n), v in norms.items()
                        if not (probe == "output" and n == "featkd")})  # zero: conv_out is downstream of the feature
    # The weights are constants, so the total gradient is one backward pass of the weighted
    # output cotangents.
    cotangent = jax.tree.map(lambda *cs: sum(coeffs[n] * c for n, c in zip(names, cs)),
                             *[terms[n][1] for n in names])
    grads = vjp(cotangent)[0]
    total = sum(coeffs[n] * values[n] for n in values)
    metrics.update({"loss": total, **{f"loss_{n}": v for n, v in values.items()}})
    return total, grads, aux, metrics
