"""Public loaders: build a network from a config and fill it from any supported weight file.

Weights may be the reference's `.bin` (torch zip pickle, read without torch), a
`.safetensors` with the same names, an EMA `.bin` (parameters from the EMA shadows,
BatchNorm statistics from the plain checkpoint beside it), a directory written by
`moebius_jax.convert`, or a Hugging Face id of any of these (`moebius_jax.hub`; fetched once
and converted once into the local cache).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moebius_jax import hub
from moebius_jax.config import TEACHER_MODEL_TYPE, ModelConfig, UNetConfig, load_config
from moebius_jax.convert import keymap as km
from moebius_jax.convert.errors import CheckpointError
from moebius_jax.convert.maps import UNET_KEYMAP
from moebius_jax.convert.orbax_io import is_orbax_dir, restore_variables
from moebius_jax.convert.state_dict import is_ema_file, read_ema_file, read_state_dict
from moebius_jax.models.removal_model import RemovalModel

PathLike = str | os.PathLike


def dummy_inputs(unet: UNetConfig, batch: int = 1) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Zero inputs of the trained resolution, for init / eval_shape."""
    side = unet.sample_size
    return (
        jnp.zeros((batch, side, side, unet.in_channels), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, unet.context_length), jnp.int32),
    )


def build_model(
    config: PathLike | Mapping | ModelConfig, dtype: Any = None, remat: bool = False
) -> tuple[RemovalModel, ModelConfig]:
    cfg = load_config(config)
    return RemovalModel(cfg.unet, dtype=dtype, remat=remat), cfg


def init_variables(model: RemovalModel, config: ModelConfig, seed: int | jax.Array) -> dict[str, Any]:
    """A random initialisation (Flax's initialisers), reproducible from `seed`.

    Only the initialisers are compiled (`lazy_init` drops the forward pass), and their bits
    come from the "rbg" generator, whose programs compile several times faster than threefry's.
    """
    key = jax.random.key(seed, impl="rbg") if isinstance(seed, int) else seed
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in dummy_inputs(config.unet)]
    return dict(jax.jit(lambda k: model.lazy_init(k, *abstract))(key))


def abstract_variables(model: RemovalModel, config: ModelConfig) -> dict[str, Any]:
    """Shapes and dtypes of every variable, without allocating them."""
    return dict(jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(config.unet)))


# The BatchNorm buffers of a torch state dict: what an EMA file lacks and its plain sibling has.
BN_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def ema_sibling(path: pathlib.Path) -> pathlib.Path:
    """The plain checkpoint saved beside an EMA file (`x.EMA.bin` -> `x.bin`)."""
    return path.with_name(path.name.replace(".EMA.", ".", 1))


def load_torch_variables(
    weights: PathLike,
    abstract: Mapping[str, Any],
    keymap: km.KeyMap = UNET_KEYMAP,
    batch_stats_from: PathLike | None = None,
) -> dict[str, Any]:
    """Reference weights (plain, safetensors or EMA) -> Flax variables shaped like `abstract`."""
    path = pathlib.Path(weights)
    if not is_ema_file(path):
        return km.to_flax(read_state_dict(path), keymap, abstract, str(path))

    # EMA files hold parameters only. The reference then silently runs with initial BatchNorm
    # statistics, which breaks eval-mode inference; we take them from the plain checkpoint.
    params = km.to_flax(read_ema_file(path).params, keymap, abstract, str(path), optional=("batch_stats",))
    if "batch_stats" not in abstract:
        return params
    stats_path = pathlib.Path(batch_stats_from) if batch_stats_from else ema_sibling(path)
    if not stats_path.exists():
        raise CheckpointError(
            f"{path}: an EMA file holds no BatchNorm statistics and {stats_path} does not exist; "
            "pass the matching plain checkpoint as batch_stats_from=..."
        )
    state = read_state_dict(stats_path)
    stats_only = {k: v for k, v in state.items() if k.endswith(BN_STAT_SUFFIXES)}
    stats = km.to_flax(stats_only, keymap, {"batch_stats": abstract["batch_stats"]}, str(stats_path))
    return {**params, **stats}


def load_weights(
    weights: PathLike, abstract: Mapping[str, Any], keymap: km.KeyMap, batch_stats_from: PathLike | None = None
) -> dict[str, Any]:
    """Any supported weight source (a Hub id included) -> host numpy variables matching `abstract`."""
    if hub.is_hub_id(weights):
        source = hub.fetch(os.fspath(weights), hub.WEIGHT_FILES)
        sources = [source]
        if batch_stats_from is None and is_ema_file(source):  # its statistics live in the plain file
            batch_stats_from = hub.fetch(str(ema_sibling(pathlib.Path(weights))))
            sources.append(batch_stats_from)
        return hub.converted_variables(
            sources, "unet", lambda: load_torch_variables(source, abstract, keymap, batch_stats_from), abstract)
    path = pathlib.Path(weights)
    if path.is_dir():
        if not is_orbax_dir(path):
            raise CheckpointError(f"{path}: a directory of weights must be written by moebius_jax.convert")
        return restore_variables(path, abstract)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    return load_torch_variables(path, abstract, keymap, batch_stats_from)


def load_model(
    config: PathLike | Mapping | ModelConfig,
    weights: PathLike | None = None,
    *,
    dtype: Any = None,
    seed: int = 0,
    batch_stats_from: PathLike | None = None,
    remat: bool = False,
) -> tuple[RemovalModel, dict[str, Any]]:
    """Build a Moebius (or any RemovalModel-config) network and its variables.

    `config`: a reference-style YAML path, its parsed dict, or a ModelConfig. `weights`:
    `.bin` / `.safetensors` / EMA `.bin` / a moebius_jax.convert directory / a Hugging Face id
    of one (`org/repo/path`, e.g. `hub.student_weights()`), or None for a random
    initialisation from `seed`. `dtype` is the compute dtype (parameters stay float32);
    `remat` turns on gradient checkpointing for training.
    """
    model, cfg = build_model(config, dtype, remat)
    if weights is None:
        return model, init_variables(model, cfg, seed)
    abstract = abstract_variables(model, cfg)
    variables = load_weights(weights, abstract, UNET_KEYMAP, batch_stats_from)
    return model, jax.tree.map(jnp.asarray, variables)


def load_teacher(
    config: PathLike | Mapping | ModelConfig, weights: PathLike | None = None, *, dtype: Any = None, seed: int = 0
) -> tuple[RemovalModel, dict[str, Any]]:
    """The PixelHacker teacher (a UNet2DGLAConditionModel config); same convention as load_model."""
    cfg = load_config(config)
    if not cfg.is_teacher:
        raise ValueError(f"load_teacher expects a {TEACHER_MODEL_TYPE} config, got {cfg.model_type}")
    return load_model(cfg, weights, dtype=dtype, seed=seed)


def export_state_dict(variables: Mapping[str, Any], keymap: km.KeyMap = UNET_KEYMAP) -> dict[str, np.ndarray]:
    """Flax variables -> the reference's state dict (names, layouts; BN counts as int64)."""
    state = km.to_torch(jax.device_get(dict(variables)), keymap)
    return {k: v.astype(np.int64) if k.endswith("num_batches_tracked") else v for k, v in state.items()}
