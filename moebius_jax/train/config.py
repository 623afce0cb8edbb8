"""Training config: typed, nested dataclasses read from YAML, overridable with `key=value`.

Defaults are the reference's demo recipe (config/train_demo.sh): Muon at 1e-4, batch 2 per
process, logit-normal timesteps, noise offset 0.0357, bf16, task weight 0.5 and, with a
teacher, KD weight 0.01 and feature weight 1.0 on student block 2 / teacher block 5.

Overrides are `dotted.key=value` (the value parsed as YAML). Integer components index lists
(`model.levels.1.self_mixer=attention`). `model` is a model YAML's path or its content;
a `model.*` override reads the file into the config first, and addresses its `data` / `vae`
/ `model` sections, or, for any other key, the `model:` section
(`model.layers_per_block=3` is `model.model.layers_per_block=3`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from moebius_jax.config import load_config, read_config_file
from moebius_jax.errors import ConfigError, read_yaml
from moebius_jax.train.optimizer import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    jsonl: str | None = None  # the reference's jsonl (image paths relative to its folder)
    folder: str | None = None  # a plain image folder
    mask_folder: str | None = None
    tfds_name: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    image_size: int = 512
    mask_config: str = "random_medium_512"
    use_extra_fg_mask: bool = False
    batch_size: int = 2  # global batch: split over the mesh's data and fsdp axes
    num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    config: str | None = None  # PixelHacker YAML; None trains on the task loss only
    weights: str | None = None
    dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class ELatentLPIPSConfig:
    weight: float = 0.0  # 0 disables the term; the reference demo uses 0.5
    trunk: str | None = None  # the package's latent-VGG trunk file
    heads: str | None = None  # its tuned linear heads
    # The reference feeds latents already scaled by the VAE factor and asks the metric to
    # scale again (normalize=True), i.e. x0 * 0.13025^2. Reproduced by default.
    double_scaling: bool = True


@dataclasses.dataclass(frozen=True)
class LossConfig:
    task_weight: float = 0.5
    kd_weight: float = 0.01  # multiplies both the feature and the output KD terms
    feat_weight: float = 1.0
    feat_index_student: int = 2
    feat_index_teacher: int = 5
    adaptive: bool = True  # gradient-norm adaptive weights (cal_adaptive_weights_type8)
    elatentlpips: ELatentLPIPSConfig = ELatentLPIPSConfig()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by fsdp
    fsdp: int = 1
    num_devices: int = -1  # -1: every device; else the first N (e.g. 1 to compare against a mesh)
    # [regex, spec] pairs deciding each array's sharding, first match wins (moebius_jax.train.mesh):
    # spec "fsdp" (largest divisible dimension), "replicate", or a PartitionSpec-like list of axes.
    rules: Sequence[Sequence[Any]] = ((".*", "fsdp"),)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str | dict[str, Any] = "configs/moebius.yaml"  # a model YAML, or its content (data/vae/model)
    init_weights: str | None = None  # None: the reference's random initialisation
    vae: str = "weight/vae"
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    seed: int = 42
    dtype: str = "bfloat16"  # compute dtype of student, VAE and teacher; master weights float32
    remat: bool = False
    timestep_sampling: str = "lognorm"  # or "uniform"
    noise_offset: float = 0.0357
    ema_decay: float | None = None  # e.g. 0.9999 enables the EMA
    max_steps: int = 200_000
    log_every: int = 10
    save_every: int = 3000
    keep_checkpoints: int = 3
    sample_every: int = 1000
    sample_steps: int = 20


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a YAML or command-line value against a dataclass field's type."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(hint):
                return None
            raise ValueError(f"{where}: may not be null")
        errors = []
        for option in options:  # the first type that takes the value
            try:
                return _coerce(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        names = " or ".join(getattr(typing.get_origin(o) or o, "__name__", str(o)) for o in options)
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: expected {names}, got {value!r}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where}: {value!r} not in {typing.get_args(hint)}")
        return value
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, typing.get_args(hint)))
    if origin is Sequence:  # kept as tuples, so a config read back from YAML equals the original
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return tuple(_coerce(v, item, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    hints = _field_types(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(hints)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()})


Key = str | int  # a mapping key, or a list index


def parse_override(item: str) -> tuple[tuple[Key, ...], Any]:
    """"a.b.0.c=value" -> (("a", "b", 0, "c"), value parsed as YAML); digit components are ints."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, text = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r}: empty key component")
    path = tuple(int(part) if part.isdigit() else part for part in key.split("."))
    try:
        return path, yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err
        raise ValueError(f"override {item!r}: not a valid YAML value ({problem})") from None


def set_path(raw: dict[str, Any], path: Sequence[Key], value: Any, key: str | None = None) -> None:
    """Set raw[path[0]][path[1]]... = value, creating missing mappings; ints index lists.
    Errors name `key` (default: the dotted path)."""
    key = key or ".".join(map(str, path))
    node: Any = raw
    for depth, part in enumerate(path):
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                raise ValueError(f"override {key}: {part!r} is not an index of a list of {len(node)}")
        elif not isinstance(node, dict):
            raise ValueError(f"override {key}: {path[depth - 1]!r} holds {node!r}, not a section")
        elif depth < len(path) - 1 and part not in node:
            node[part] = {}
        if depth == len(path) - 1:
            node[part] = value
        else:
            node = node[part]


# The sections of a model YAML; any other key under `model.` addresses its `model:` section.
_MODEL_SECTIONS = ("data", "vae", "model")


def read_model(model: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The content of a TrainConfig's `model` (read from the file when it is a path)."""
    return copy.deepcopy(dict(model)) if isinstance(model, Mapping) else read_config_file(model)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`key=value` overrides applied in order to a train config's settings (see the module doc)."""
    for item in overrides:
        path, value = parse_override(item)
        if path[0] == "model" and len(path) > 1:
            raw["model"] = read_model(raw.get("model", TrainConfig.model))
            if path[1] not in _MODEL_SECTIONS:
                path = ("model", "model", *path[1:])
        set_path(raw, path, value, key=item.split("=", 1)[0])
    return raw


def load_train_config(path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (optional) + overrides -> TrainConfig, its model validated; errors name the key."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a YAML mapping")
    where = path or "train config"
    try:
        config = _build(TrainConfig, apply_overrides(raw, overrides), "")
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e
    try:
        load_config(config.model)  # refuses an impossible variant before anything is built
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: model: {e}") from e
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data, the model's content included, so that it alone reproduces a run."""
    return {**dataclasses.asdict(config), "model": read_model(config.model)}
