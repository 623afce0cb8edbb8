"""The trainer's optimiser from one small config: torch-style clipping, then Muon or AdamW.

`make_optimizer(OptimizerConfig(), params)` is the reference's setup: clip_grad_norm_(1.0),
Muon (lr 1e-4, wd 0.1, momentum 0.95, Nesterov, 5 NS steps, AdamW betas (0.9, 0.95), eps
1e-8), constant lr. For logging, the lr of 0-based optimizer step k is `make_schedule(config)(k)`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from moebius_jax.train.muon import muon, muon_param_labels


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser settings; the defaults are the reference's training recipe.

    `max_grad_norm` 0 disables clipping. `adamw_*` set both
    Muon's internal AdamW branch and the plain "adamw" optimiser. `total_steps` and `min_lr`
    are read by the cosine schedule only.
    """

    name: Literal["muon", "adamw"] = "muon"
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    max_grad_norm: float = 1.0
    schedule: Literal["constant_with_warmup", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    total_steps: int = 200_000
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("muon", "adamw"):
            raise ValueError(f"unknown optimizer {self.name!r} (muon | adamw)")
        if self.schedule not in ("constant_with_warmup", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r} (constant_with_warmup | cosine)")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps and max_grad_norm must be >= 0")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"cosine schedule: total_steps ({self.total_steps}) must exceed "
                             f"warmup_steps ({self.warmup_steps})")


def torch_global_norm(tree: optax.Updates) -> jax.Array:
    """Global L2 norm as torch's clip_grad_norm_ forms it: the norm of the per-tensor norms."""
    norms = [jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32)) for x in jax.tree.leaves(tree)]
    return jnp.linalg.norm(jnp.stack(norms)) if norms else jnp.zeros([], jnp.float32)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: grads·min(1, max_norm / (total_norm + 1e-6)).

    optax.clip_by_global_norm instead rescales by max_norm/total_norm only above max_norm,
    without the 1e-6; the two differ by a relative ~1e-6/total_norm whenever clipping acts.
    """

    def update_fn(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / (torch_global_norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The lr of 0-based optimizer step k, as diffusers' `get_scheduler` gives it.

    The reference's LambdaLR is stepped after `optimizer.step()`, so its first step uses
    factor(0): lr·k/warmup during the warm-up (0 at step 0), then lr (constant_with_warmup),
    or a half cosine from lr down to `min_lr` at `total_steps` (cosine; with min_lr 0 it is
    diffusers' num_cycles 0.5 up to total_steps, after which diffusers' climbs again and this
    stays at min_lr).
    """
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, config.total_steps, end_value=config.min_lr)
    if warmup == 0:  # optax's warm-up over 0 steps would hold its initial value, 0, for ever
        return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup)


def make_optimizer(config: OptimizerConfig, params: optax.Params) -> optax.GradientTransformation:
    """clip (torch rule) → Muon or AdamW on the schedule. Emits complete updates.

    `params` (the "params" collection; arrays or shapes) fixes Muon's split up front. "adamw" is optax.adamw with the config's betas, eps and weight
    decay on every parameter (torch AdamW semantics, eps after bias correction).
    """
    schedule = make_schedule(config)
    if config.name == "muon":
        core = muon(
            schedule,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            nesterov=config.nesterov,
            ns_steps=config.ns_steps,
            adamw_betas=config.adamw_betas,
            adamw_eps=config.adamw_eps,
            param_labels=muon_param_labels(params),
        )
    else:
        b1, b2 = config.adamw_betas
        core = optax.adamw(
            schedule, b1=b1, b2=b2, eps=config.adamw_eps, weight_decay=config.weight_decay
        )
    if config.max_grad_norm > 0:
        return optax.chain(clip_by_global_norm_torch(config.max_grad_norm), core)
    return core
