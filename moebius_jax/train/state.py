"""The train state: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax

from moebius_jax.train.ema import EmaState, ema_init


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics (updated in train mode, not optimised)
    opt_state: optax.OptState
    ema: EmaState | None  # shadow parameters, when the EMA is enabled
    key: jax.Array  # base PRNG key; step k uses fold_in(key, k)

    @classmethod
    def create(cls, variables: Any, tx: optax.GradientTransformation, key: jax.Array,
               ema_decay: float | None = None) -> TrainState:
        params = variables["params"]
        return cls(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            ema=None if ema_decay is None else ema_init(params, ema_decay),
            key=jax.random.key_data(key),
        )

    def variables(self, use_ema: bool = False) -> dict[str, Any]:
        params = self.ema.shadow if use_ema and self.ema is not None else self.params
        return {"params": params, "batch_stats": self.batch_stats}
