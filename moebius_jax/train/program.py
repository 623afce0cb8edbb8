"""A training run apart from its weights: the networks, the train step jitted with its
shardings, and the sharded materialisation of the state and of the frozen networks.

`make_train_program` allocates nothing: it holds abstract arrays (ShapeDtypeStructs with
shardings), so the step can be lowered and compiled for a mesh of devices that need not be
present. `init_state` and `load_frozen` then put the weights straight into those shardings:
random initialisation runs as one program whose outputs are already sharded, and weights read
from files go from the host to their shards, never through one whole-model copy on a device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from moebius_jax.config import TEACHER_MODEL_TYPE, ModelConfig
from moebius_jax.convert.maps import UNET_KEYMAP
from moebius_jax.dtypes import DTYPES
from moebius_jax.errors import ConfigError
from moebius_jax.loading import abstract_variables, build_model, init_variables, load_weights
from moebius_jax.models.removal_model import RemovalModel
from moebius_jax.models.vae import AutoencoderKL
from moebius_jax.train.config import TrainConfig
from moebius_jax.train.mesh import (batch_sharding, describe_shardings, mesh_from_config, replicated,
                                    tree_shardings, with_shardings)
from moebius_jax.train.objective import ExtraLoss
from moebius_jax.train.optimizer import make_optimizer
from moebius_jax.train.state import TrainState
from moebius_jax.train.step import Frozen, make_train_step
from moebius_jax.vae_loading import abstract_vae_variables, load_vae, vae_module


@dataclasses.dataclass(frozen=True)
class Networks:
    """The modules of a run, built from its configs without reading any weights."""

    student: RemovalModel
    student_config: ModelConfig
    vae: AutoencoderKL
    teacher: RemovalModel | None = None
    teacher_config: ModelConfig | None = None
    extra_loss: ExtraLoss | None = None  # E-LatentLPIPS, when its weight is non-zero

    @classmethod
    def from_config(cls, config: TrainConfig) -> Networks:
        student, student_config = build_model(config.model, DTYPES[config.dtype], config.remat)
        vae = vae_module(config.vae, dtype=DTYPES[config.dtype])
        teacher = teacher_config = None
        if config.teacher.config is not None:
            teacher, teacher_config = build_model(config.teacher.config, DTYPES[config.teacher.dtype])
            if not teacher_config.is_teacher:
                raise ConfigError(f"{config.teacher.config}: expected a {TEACHER_MODEL_TYPE} config, "
                                  f"got {teacher_config.model_type}", field=("teacher", "config"))
        return cls(student, student_config, vae, teacher, teacher_config, _extra_loss(config))

    def abstract_frozen(self) -> Frozen:
        """Shapes and stored dtypes of the frozen variables (see `store_frozen`)."""
        extra = None
        if self.extra_loss is not None:
            from moebius_jax.losses.elatentlpips import ELatentLPIPS
            from moebius_jax.losses.elatentlpips_weights import abstract_variables as metric_variables

            extra = ELatentLPIPS(metric_variables())
        teacher = None if self.teacher is None else abstract_variables(self.teacher, self.teacher_config)
        return jax.eval_shape(self.store_frozen, Frozen(abstract_vae_variables(self.vae), teacher, extra))

    def store_frozen(self, frozen: Frozen) -> Frozen:
        """Frozen variables as they are kept on the devices: each network's matrices (>= 2-D:
        conv and dense kernels, embeddings) in its compute dtype, since every use casts them to
        it anyway; vectors (norms, biases) and float32 networks unchanged."""
        return Frozen(vae=_store(frozen.vae, self.vae.dtype),
                      teacher=None if frozen.teacher is None else _store(frozen.teacher, self.teacher.dtype),
                      extra=frozen.extra)


def _store(variables: Any, dtype: Any) -> Any:
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return variables
    return jax.tree.map(lambda x: x.astype(dtype) if np.ndim(x) >= 2 else x, variables)


def _extra_loss(config: TrainConfig) -> ExtraLoss | None:
    """The E-LatentLPIPS term if its weight is non-zero: mean distance of the predicted and
    target x0 latents, given the metric's network (a frozen variable of the step)."""
    el = config.loss.elatentlpips
    if el.weight == 0:
        return None
    from moebius_jax.losses import elatentlpips_distance

    def loss(metric, x0_pred, x0_target, key):
        return jnp.mean(elatentlpips_distance(metric, x0_pred, x0_target, key=key, normalize=el.double_scaling))

    return loss


def batch_spec(config: TrainConfig, context_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A global training batch's shapes (the loader's contract, moebius_jax.data)."""
    b, s = config.data.batch_size, config.data.image_size
    return {
        "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
        "masked_image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
        "mask": jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((b, context_length), jnp.int32),
    }


def _shardings(abstract: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, abstract)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The jitted train step and state initialiser with their shardings, and the abstract
    arguments (ShapeDtypeStructs carrying shardings) the step is compiled for."""

    mesh: Mesh
    state: TrainState
    frozen: Frozen
    batch: dict[str, jax.ShapeDtypeStruct]
    step: Any  # jit(step)(state, frozen, batch) -> (state, metrics); the state is donated
    init: Any  # jit(create)(student variables or None) -> the sharded TrainState

    def lower(self) -> jax.stages.Lowered:
        return self.step.lower(self.state, self.frozen, self.batch)

    def describe(self) -> list[str]:
        """Every parameter's and frozen weight's PartitionSpec, and per-device totals."""
        lines = [f"mesh {dict(self.mesh.shape)} over {self.mesh.size} {self.mesh.devices.flat[0].platform} devices"]
        for title, prefix, tree in (("student parameters", "params/", self.state.params),
                                    ("BatchNorm statistics", "batch_stats/", self.state.batch_stats),
                                    ("frozen networks", "", self.frozen)):
            lines += [f"# {title}", *describe_shardings(tree, _shardings(tree), prefix)]
        lines.append("# the whole train state (parameters, statistics, optimiser state, EMA, step, key)")
        lines.append(describe_shardings(self.state, _shardings(self.state))[-1])
        return lines


def make_train_program(config: TrainConfig, networks: Networks, mesh: Mesh) -> TrainProgram:
    """Everything that can be decided before any weight exists: optimiser, step, shardings."""
    student, student_config = networks.student, networks.student_config
    tx = make_optimizer(config.optimizer, abstract_variables(student, student_config)["params"])
    step = make_train_step(student, networks.vae, tx, config, networks.teacher, networks.extra_loss)

    def create(variables: dict[str, Any] | None) -> TrainState:
        if variables is None:  # the reference's random initialisation, from the seed
            variables = init_variables(student, student_config, config.seed)
        return TrainState.create(variables, tx, jax.random.key(config.seed), config.ema_decay)

    abstract_state = jax.eval_shape(create, None)
    state_shardings = tree_shardings(abstract_state, mesh, config.mesh.rules)
    abstract_frozen = networks.abstract_frozen()
    frozen_shardings = tree_shardings(abstract_frozen, mesh, config.mesh.rules)
    batch = batch_spec(config, student_config.unet.context_length)
    batch_shardings = {k: batch_sharding(mesh) for k in batch}
    return TrainProgram(
        mesh=mesh,
        state=with_shardings(abstract_state, state_shardings),
        frozen=with_shardings(abstract_frozen, frozen_shardings),
        batch=with_shardings(batch, batch_shardings),
        step=jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,)),
        init=jax.jit(create, out_shardings=state_shardings, donate_argnums=(0,)),
    )


def init_state(config: TrainConfig, networks: Networks, program: TrainProgram) -> TrainState:
    """The train state in its shardings: from `init_weights` (read on the host, put shard by
    shard) or the seeded random initialisation (computed sharded)."""
    if config.init_weights is None:
        return program.init(None)
    abstract = abstract_variables(networks.student, networks.student_config)
    host = load_weights(config.init_weights, abstract, UNET_KEYMAP)
    state = program.state
    placed = jax.device_put(host, {"params": _shardings(state.params), "batch_stats": _shardings(state.batch_stats)})
    return program.init(placed)


def load_frozen(config: TrainConfig, networks: Networks, program: TrainProgram) -> Frozen:
    """The VAE, teacher and E-LatentLPIPS variables, stored and sharded as `program` expects."""
    _, vae = load_vae(config.vae)
    teacher = None
    if networks.teacher is not None:
        if config.teacher.weights is None:  # a random teacher, for demos and tests
            teacher = init_variables(networks.teacher, networks.teacher_config, 0)
        else:
            abstract = abstract_variables(networks.teacher, networks.teacher_config)
            teacher = load_weights(config.teacher.weights, abstract, UNET_KEYMAP)
    extra = None
    if networks.extra_loss is not None:
        from moebius_jax.losses import load_elatentlpips

        extra = load_elatentlpips(config.loss.elatentlpips.trunk, config.loss.elatentlpips.heads)
    return jax.device_put(networks.store_frozen(Frozen(vae, teacher, extra)), _shardings(program.frozen))


def describe_program(config: TrainConfig, devices: list | None = None) -> list[str]:
    """`TrainProgram.describe` for a config, on its mesh over `devices` (default all)."""
    mesh = mesh_from_config(config.mesh, devices)
    return make_train_program(config, Networks.from_config(config), mesh).describe()
