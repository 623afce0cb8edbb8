"""Load the VAE: `load_vae(path) -> (vae, variables)`, and write our own converted copy.

`path` may be
  * a diffusers VAE folder: config.json + diffusion_pytorch_model.safetensors (else .bin),
    with current or legacy (query/key/value/proj_attn) attention names;
  * one CompVis/LDM file (.ckpt/.safetensors/...): a standalone VAE, or a whole SD checkpoint
    whose VAE sits under `first_stage_model.`. Such files carry no config: pass `config=`
    (a config.json path, a folder holding one, a dict or a VaeConfig); the default is the
    SD 1.x VAE (`SD_VAE_CONFIG`, scaling_factor 0.18215) — pass the SDXL config for SDXL;
  * a folder written by `save_vae` (orbax variables + config.json);
  * a Hugging Face id of a diffusers folder or an LDM file (`moebius_jax.hub`, e.g.
    `hub.DEFAULT_VAE`), fetched once and converted once into the local cache.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moebius_jax import hub
from moebius_jax.convert import keymap as km
from moebius_jax.convert.errors import CheckpointError
from moebius_jax.convert.orbax_io import is_orbax_dir, restore_variables, save_variables
from moebius_jax.convert.state_dict import read_state_dict
from moebius_jax.convert.vae_keys import VAE_KEYMAP, normalise_vae_state
from moebius_jax.errors import ConfigError
from moebius_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL, VaeConfig

PathLike = str | os.PathLike

CONFIG_FILE = "config.json"


def load_vae_config(config: PathLike | Mapping[str, Any] | VaeConfig | None) -> VaeConfig:
    """A VaeConfig from a config.json (or a folder holding one), a dict, a VaeConfig, or None (SD)."""
    if config is None:
        return SD_VAE_CONFIG
    if isinstance(config, VaeConfig):
        return config
    if isinstance(config, Mapping):
        return VaeConfig.from_dict(config)
    path = pathlib.Path(config)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"VAE config not found: {path}")
    try:
        return VaeConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError) as e:  # invalid JSON, unsupported or mistyped fields
        raise ConfigError(f"{path}: {e}") from e


def abstract_vae_variables(vae: AutoencoderKL) -> dict[str, Any]:
    """Shapes and dtypes of every VAE variable, without allocating them."""
    return dict(jax.eval_shape(vae.init, jax.random.key(0), _dummy_images(vae.config)))


def _dummy_images(config: VaeConfig) -> jnp.ndarray:
    side = config.downsample_factor  # the smallest image with a 1x1 latent
    return jnp.zeros((1, side, side, config.in_channels), jnp.float32)


def vae_variables_from_state(
    state: Mapping[str, Any], vae: AutoencoderKL, source: str
) -> dict[str, Any]:
    """A VAE state dict in any supported naming -> host variables; CheckpointMismatchError lists every bad key."""
    state = normalise_vae_state(state, len(vae.config.block_out_channels))
    return km.to_flax(state, VAE_KEYMAP, abstract_vae_variables(vae), source)


def _weights_file(folder: pathlib.Path) -> pathlib.Path:
    for name in hub.WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder}: not a VAE folder: expected {' or '.join(hub.WEIGHT_FILES)} (diffusers) "
        "or variables/ (written by save_vae)"
    )


def vae_module(
    path: PathLike, *, config: PathLike | Mapping[str, Any] | VaeConfig | None = None, dtype: Any = None
) -> AutoencoderKL:
    """The module `load_vae(path, config=config, dtype=dtype)` builds, from the config alone: a
    folder's config.json (fetched alone for a Hub folder), else `config`, else the SD 1.x VAE."""
    if hub.is_hub_id(path):
        spec = os.fspath(path)
        if config is None and not pathlib.PurePosixPath(spec).suffix:  # a folder, not one LDM file
            config = hub.fetch(f"{spec.rstrip('/')}/{CONFIG_FILE}")
    else:
        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"VAE weights not found: {path}")
        if config is None and path.is_dir():
            config = path
    return AutoencoderKL(load_vae_config(config), dtype=dtype)


def load_vae(
    path: PathLike, *, config: PathLike | Mapping[str, Any] | VaeConfig | None = None, dtype: Any = None
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Build the VAE and its variables from a diffusers folder, an LDM file, a `save_vae` folder
    or a Hugging Face id of the first two.

    `config` overrides the folder's config.json and is the only config source for an LDM
    file (default: the SD 1.x VAE). `dtype` is the compute dtype; parameters stay float32.
    """
    vae = vae_module(path, config=config, dtype=dtype)
    if hub.is_hub_id(path):
        spec = os.fspath(path)
        weights = hub.fetch(spec) if pathlib.PurePosixPath(spec).suffix else hub.fetch(spec, hub.WEIGHT_FILES)
        variables = hub.converted_variables(
            [weights], "vae", lambda: vae_variables_from_state(read_state_dict(weights), vae, str(weights)),
            abstract_vae_variables(vae))
    elif is_orbax_dir(pathlib.Path(path)):
        variables = restore_variables(path, abstract_vae_variables(vae))
    else:
        path = pathlib.Path(path)
        weights = _weights_file(path) if path.is_dir() else path
        variables = vae_variables_from_state(read_state_dict(weights), vae, str(weights))
    return vae, jax.tree.map(jnp.asarray, variables)


def save_vae(
    directory: PathLike, vae: AutoencoderKL, variables: Mapping[str, Any], overwrite: bool = False
) -> pathlib.Path:
    """Write `variables` (orbax) and the diffusers config.json; `load_vae(directory)` reads them back."""
    directory = save_variables(directory, variables, overwrite=overwrite)
    (directory / CONFIG_FILE).write_text(json.dumps(vae.config.to_dict(), indent=2) + "\n")
    return directory
