"""Exponential moving average of the parameters, exactly as the reference's LitEma.

Only parameters are averaged: like LitEma, BatchNorm running statistics are not tracked
(an EMA checkpoint takes them from the plain model). Pure functions on an explicit state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class EmaState(NamedTuple):
    """Shadow parameters (float32, same tree as the params), updates so far, decay cap."""

    shadow: Any
    num_updates: jax.Array  # int32 scalar, 0 before the first update
    decay: jax.Array  # float32 scalar


def ema_init(params: Any, decay: float = 0.9999) -> EmaState:
    """A fresh EMA whose shadows are float32 copies of `params` (LitEma's construction)."""
    shadow = jax.tree.map(lambda p: jnp.array(p, jnp.float32), params)
    return EmaState(shadow, jnp.zeros([], jnp.int32), jnp.asarray(decay, jnp.float32))


def ema_update(state: EmaState, params: Any) -> EmaState:
    """One update after an optimizer step: n += 1; d = min(decay, (1+n)/(10+n));
    shadow ← shadow − (1−d)·(shadow − param). The warm-up term makes the first d = 2/11."""
    num_updates = state.num_updates + 1
    n = num_updates.astype(jnp.float32)
    one_minus_d = 1.0 - jnp.minimum(state.decay, (1.0 + n) / (10.0 + n))
    shadow = jax.tree.map(
        lambda s, p: s - one_minus_d * (s - p.astype(jnp.float32)), state.shadow, params
    )
    return EmaState(shadow, num_updates, state.decay)
