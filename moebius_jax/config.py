"""Typed model configs, and a reader for the reference's YAML model configs as they are.

The reference describes a network with a `data` / `vae` / `model` YAML (see
`configs/moebius.yaml`). We turn that into one generic UNet description: a list of levels,
each saying its width and which token mixers its transformer blocks use. The Moebius student
and the PixelHacker teacher are two points of that space (`model_type` picks the defaults).

Variants are data: besides the reference's keys, the `model:` section may hold

    layers_per_block: 2                 # resnets per down block (up blocks get one more)
    levels:                             # per-level overrides, a list (one entry per level)
      - {}                              # or a mapping {level index: overrides}
      - {self_mixer: attention}
      - {channels: 1024, feed_forward: geglu, ff_mult: 3, transformer_depth: 2}
    mid_level: {self_mixer: linear_attention}   # teacher only (it has a mid block)

Override fields are LevelConfig's: channels, attention, self_mixer, cross_mixer,
feed_forward, ff_mult, transformer_depth and mixer_options ({mixer name: {option: value}}).
The mixer names and their options are those of the registry in `moebius_jax.layers.mixers`.
A file without these keys reads exactly as before.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from flax.core import FrozenDict

from moebius_jax.errors import ConfigError, read_yaml
from moebius_jax.layers import mixers

# The shipped model configs (reference schema) live at the top of the source tree.
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

STUDENT_MODEL_TYPE = "UNet2DLambdaDWConvMixFFNConditionModel_prune_down_mid_up_block_8x8"
TEACHER_MODEL_TYPE = "UNet2DGLAConditionModel"

CONV_KINDS = ("dwsep", "dense")


@dataclasses.dataclass(frozen=True)
class LevelConfig:
    """One resolution level of the UNet: its width and what its transformer blocks contain."""

    channels: int
    attention: bool = True  # resnet -> transformer pairs (True) or plain resnets (False)
    self_mixer: str = "local_lambda"
    cross_mixer: str = "cross_lambda"
    feed_forward: str = "mix_ffn"
    transformer_depth: int = 1
    ff_mult: float | None = None  # FFN hidden = int(ff_mult * channels); None: 2.5 (Mix-FFN) / 4 (GEGLU)
    # {mixer name: {option: value}} for the mixers this level uses; unset options keep the
    # mixer's defaults. Frozen, so that configs (and the modules holding them) stay hashable.
    mixer_options: Mapping[str, Mapping[str, Any]] = FrozenDict()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixer_options", FrozenDict(self.mixer_options))


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes the UNet's structure and parameter shapes.

    `sample_size` is the latent side the weights were trained at; it sizes the
    Interactive-lambda positional tables (S^2 rows per level).
    """

    levels: tuple[LevelConfig, ...]
    in_channels: int = 9
    out_channels: int = 4
    layers_per_block: int = 2
    mid_level: LevelConfig | None = None  # the teacher's resnet -> transformer -> resnet mid block
    conv_kind: str = "dwsep"  # conv_in / conv_out / resnet convs: depthwise-separable or dense 3x3
    num_heads: int = 8  # the reference's `attention_head_dim`, which diffusers uses as a head count
    cross_attention_dim: int = 768
    encoder_hid_dim: int = 3072
    num_embeddings: int = 20
    sample_size: int = 64
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6
    mix_mlp_ratio: float = 2.5

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(level.channels for level in self.levels)

    @property
    def context_length(self) -> int:
        """Tokens per condition: the ids split into two tasks of num_embeddings / 2 tokens."""
        return self.num_embeddings // 2

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.levels[0].channels

    def native_side(self, level: int) -> int:
        """Latent side of `level` at the trained resolution (the down path halves per level)."""
        return self.sample_size // (2**level)

    def validate(self) -> None:
        """Raise ValueError naming the first impossible combination (level and field)."""
        if not self.levels:
            raise ValueError("UNet config needs at least one level")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block {self.layers_per_block}: need at least one resnet per block")
        for i, level in enumerate(self.levels):
            _validate_level(self, level, f"level {i}")
        if self.mid_level is not None:
            _validate_level(self, self.mid_level, "mid_level")
            if self.mid_level.channels != self.levels[-1].channels:
                raise ValueError(
                    f"mid_level channels={self.mid_level.channels}: must equal the last level's "
                    f"{self.levels[-1].channels}"
                )
        if self.conv_kind not in CONV_KINDS:
            raise ValueError(f"conv_kind {self.conv_kind!r} not in {CONV_KINDS}")
        if self.sample_size % (2 ** (len(self.levels) - 1)):
            raise ValueError(
                f"sample_size {self.sample_size} is not divisible by 2^{len(self.levels) - 1}"
            )


def _validate_level(unet: UNetConfig, level: LevelConfig, where: str) -> None:
    """Check one level's choices against each other and the network-wide settings."""
    c = level.channels
    if c < 1:
        raise ValueError(f"{where} channels={c}: must be positive")
    if c % unet.norm_num_groups:
        raise ValueError(f"{where} channels={c}: not divisible by norm_num_groups {unet.norm_num_groups}")
    used = []
    for slot in mixers.SLOTS:
        try:
            mixer = mixers.lookup(slot, getattr(level, slot))
        except ValueError as e:
            raise ValueError(f"{where} {e}") from None
        used += [] if mixer is None else [mixer]
    if not level.attention:
        return  # a resnet-only level: its mixer fields are never used
    names = [mixer.name for mixer in used]
    for name in level.mixer_options:
        if name not in names:
            raise ValueError(f"{where} mixer_options.{name}: this level uses no {name!r} (it uses {', '.join(names)})")
    for mixer in used:
        try:
            options = mixer.options(level)
        except ValueError as e:
            raise ValueError(f"{where} {e}") from None
        problem = mixer.check(unet, level, options) if mixer.check else None
        if problem:
            raise ValueError(f"{where} {mixer.slot}={mixer.name!r}: {problem}")
    if level.transformer_depth < 1:
        raise ValueError(f"{where} transformer_depth={level.transformer_depth}: need at least one block")
    if level.ff_mult is not None and int(level.ff_mult * c) < 1:
        raise ValueError(f"{where} ff_mult={level.ff_mult}: the feed-forward needs a positive hidden width")


@dataclasses.dataclass(frozen=True)
class VaeRef:
    """The `vae` section of a reference config: which autoencoder the latents come from."""

    model_name: str = "sdvae_f8d4"
    model_dir: str = "./weight/vae"
    downsample_ratio: int = 8
    embed_dim: int = 4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole reference-style model config: image size, VAE reference and the UNet."""

    model_type: str
    image_size: int
    vae: VaeRef
    unet: UNetConfig

    @property
    def is_teacher(self) -> bool:
        return self.model_type == TEACHER_MODEL_TYPE


# Keys of the reference's `model:` section that the readers below interpret besides the
# network-wide fields of `_common_unet_fields` (block types and the reference's switches
# choose the levels' mixers; attention_head_dim is the head count).
_READ_MODEL_KEYS = {
    "model_type",
    "encoder_hid_dim_type",  # must be text_proj: a Linear encoder_hid_dim -> cross_attention_dim
    "conv_in_kernel",  # must be 3, as in every released config
    "conv_out_kernel",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "use_lambda_cross_attn",
    "use_local_self_attn",
    "attention_head_dim",
    "block_out_channels",
    "mix_mlp_ratio",  # the student's Mix-FFN width ratio
}
# Keys the reference's files carry that fix nothing in the network: accepted and ignored.
_IGNORED_MODEL_KEYS = {
    "projection_class_embeddings_input_dim",  # the reference has no class embedding to project
}
# Our extension of the schema (variants): read by `override_levels`, absent from reference files.
_VARIANT_KEYS = {"levels", "mid_level"}

_STUDENT_BLOCKS = ("DWMixTFDownBlock2D", "DWMixTFUpBlock2D")
_TEACHER_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_TEACHER_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _student_unet(model: Mapping[str, Any], sample_size: int, num_embeddings: int) -> UNetConfig:
    channels = tuple(model["block_out_channels"])
    for kind in list(model.get("down_block_types", ())) + list(model.get("up_block_types", ())):
        if kind not in _STUDENT_BLOCKS:
            raise ValueError(f"student block type {kind!r} is not supported (expected {_STUDENT_BLOCKS})")
    if model.get("mid_block_type") is not None:
        raise ValueError("the Moebius student has no mid block; mid_block_type must be null")
    # use_local_self_attn: False selects the reference's global-lambda self layer.
    self_mixer = "local_lambda" if model.get("use_local_self_attn", True) else "global_lambda"
    cross_mixer = "cross_lambda" if model.get("use_lambda_cross_attn", True) else "attention"
    levels = tuple(
        LevelConfig(c, True, self_mixer, cross_mixer, "mix_ffn") for c in channels
    )
    return UNetConfig(
        levels=levels,
        conv_kind="dwsep",
        mix_mlp_ratio=float(model.get("mix_mlp_ratio", 2.5)),
        sample_size=sample_size,
        num_embeddings=num_embeddings,
        **_common_unet_fields(model),
    )


def _teacher_unet(model: Mapping[str, Any], sample_size: int, num_embeddings: int) -> UNetConfig:
    channels = tuple(model.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(channels)
    down = tuple(model.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
    up = tuple(model.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)))
    for kind in down:
        if kind not in _TEACHER_DOWN:
            raise ValueError(f"teacher down block type {kind!r} not in {sorted(_TEACHER_DOWN)}")
    for kind in up:
        if kind not in _TEACHER_UP:
            raise ValueError(f"teacher up block type {kind!r} not in {sorted(_TEACHER_UP)}")
    attention = tuple(_TEACHER_DOWN[k] for k in down)
    if tuple(_TEACHER_UP[k] for k in reversed(up)) != attention:
        raise ValueError("up block types must mirror the down block types")
    mid = model.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"teacher mid block type {mid!r} is not supported")
    levels = tuple(
        LevelConfig(c, a, "gla", "attention", "geglu") for c, a in zip(channels, attention)
    )
    return UNetConfig(
        levels=levels,
        mid_level=None if mid is None else LevelConfig(channels[-1], True, "gla", "attention", "geglu"),
        conv_kind="dense",
        sample_size=sample_size,
        num_embeddings=num_embeddings,
        **_common_unet_fields(model),
    )


def _common_unet_fields(model: Mapping[str, Any]) -> dict[str, Any]:
    fields = {
        "in_channels": model.get("in_channels", 9),
        "out_channels": model.get("out_channels", 4),
        "num_heads": model.get("attention_head_dim", 8),
        "cross_attention_dim": model.get("cross_attention_dim", 768),
        "encoder_hid_dim": model.get("encoder_hid_dim", 3072),
    }
    for key in ("layers_per_block", "norm_num_groups", "norm_eps"):
        if key in model:
            fields[key] = model[key]
    unknown = set(model) - _READ_MODEL_KEYS - _IGNORED_MODEL_KEYS - _VARIANT_KEYS - set(fields)
    if unknown:
        raise ValueError(f"unknown model config key(s): {sorted(unknown)}")
    if model.get("encoder_hid_dim_type", "text_proj") != "text_proj":
        raise ValueError("only encoder_hid_dim_type: text_proj is supported")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if model.get(key, 3) != 3:
            raise ValueError(f"{key} {model[key]}: only 3 is supported")
    return fields


# Fields a `levels:` / `mid_level:` override may set, with the YAML types they accept.
_OVERRIDE_TYPES: dict[str, tuple[type, ...]] = {
    "channels": (int,),
    "attention": (bool,),
    "self_mixer": (str,),
    "cross_mixer": (str,),
    "feed_forward": (str,),
    "ff_mult": (int, float),
    "transformer_depth": (int,),
    "mixer_options": (Mapping,),
}
# The fields that only mean something inside a transformer (a level with attention: true).
_TRANSFORMER_FIELDS = {"self_mixer", "cross_mixer", "feed_forward", "ff_mult", "transformer_depth", "mixer_options"}


def _override_level(
    level: LevelConfig, changes: Mapping[str, Any], where: str, fixed: tuple[str, ...] = ()
) -> LevelConfig:
    """`level` with `changes` applied; unknown fields and wrong types are errors naming `where`."""
    if not isinstance(changes, Mapping):
        raise ValueError(f"{where}: expected a mapping of overrides, got {changes!r}")
    for field, value in changes.items():
        if field not in _OVERRIDE_TYPES or field in fixed:
            allowed = sorted(set(_OVERRIDE_TYPES) - set(fixed))
            raise ValueError(f"{where} {field}: not an override field (expected one of {allowed})")
        types = _OVERRIDE_TYPES[field]
        # YAML booleans are ints to Python; only `attention` may be one.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{where} {field}={value!r}: expected {' or '.join(t.__name__ for t in types)}")
    return dataclasses.replace(level, **changes)


def override_levels(
    unet: UNetConfig,
    levels: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]] | None = None,
    mid_level: Mapping[str, Any] | None = None,
) -> UNetConfig:
    """A variant of `unet`: per-level overrides (a full list, or {level index: overrides}) and
    mid-block overrides, validated. The YAML `levels:` / `mid_level:` keys go through here."""
    new_levels = list(unet.levels)
    if levels is not None:
        if isinstance(levels, Mapping):
            items = list(levels.items())
        elif isinstance(levels, Sequence) and not isinstance(levels, str):
            if len(levels) != len(unet.levels):
                raise ValueError(
                    f"levels: {len(levels)} entries for {len(unet.levels)} levels "
                    "(give one mapping per level, or a mapping {level index: overrides})"
                )
            items = list(enumerate(levels))
        else:
            raise ValueError(f"levels: expected a list or a mapping, got {levels!r}")
        for index, changes in items:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(unet.levels):
                raise ValueError(f"levels: no level {index!r} (the network has levels 0..{len(unet.levels) - 1})")
            level = _override_level(new_levels[index], changes, f"level {index}")
            inner = sorted(set(changes) & _TRANSFORMER_FIELDS)
            if inner and not level.attention:
                raise ValueError(
                    f"level {index} {inner[0]}: this level has no transformer (attention: false); "
                    "set attention: true to give it one"
                )
            new_levels[index] = level
    mid = unet.mid_level
    if mid is not None:
        mid = dataclasses.replace(mid, channels=new_levels[-1].channels)  # the mid block runs at the last width
    if mid_level is not None:
        if mid is None:
            raise ValueError("mid_level: this network has no mid block to override")
        mid = _override_level(mid, mid_level, "mid_level", fixed=("channels", "attention"))
    variant = dataclasses.replace(unet, levels=tuple(new_levels), mid_level=mid)
    variant.validate()
    return variant


# Numeric fields of the reference schema, checked before use so that a wrong type is reported
# with its field and value (not as a failed comparison deep inside the build).
_INT_FIELDS = (("data", "image_size"), ("vae", "downsample_ratio"), ("vae", "embed_dim"),
               ("model", "in_channels"), ("model", "out_channels"), ("model", "attention_head_dim"),
               ("model", "cross_attention_dim"), ("model", "encoder_hid_dim"), ("model", "layers_per_block"),
               ("model", "norm_num_groups"))
_NUMBER_FIELDS = (("model", "norm_eps"), ("model", "mix_mlp_ratio"))
_INT_LIST_FIELDS = (("model", "block_out_channels"),)


def _check_field_types(raw: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the field and value of the first section or number of the wrong type."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is no count

    for section in ("data", "vae", "model"):
        if section not in raw:
            raise ConfigError(f"model config lacks the `{section}:` section")
        if not isinstance(raw[section], Mapping):
            raise ConfigError(f"expected a mapping, got {raw[section]!r}", field=(section,))
    for fields, ok, expected in ((_INT_FIELDS, is_int, "an integer"),
                                 (_NUMBER_FIELDS, lambda v: is_int(v) or isinstance(v, float), "a number")):
        for section, key in fields:
            value = raw[section].get(key, 0)
            if not ok(value):
                hint = " (YAML reads 1e-5 without a dot as text: write 1.0e-5)" if isinstance(value, str) else ""
                raise ConfigError(f"expected {expected}, got {value!r}{hint}", field=(section, key))
    for section, key in _INT_LIST_FIELDS:
        values = raw[section].get(key, [])
        if not isinstance(values, Sequence) or isinstance(values, str):
            raise ConfigError(f"expected a list of integers, got {values!r}", field=(section, key))
        for i, value in enumerate(values):
            if not is_int(value):
                raise ConfigError(f"expected an integer, got {value!r}", field=(section, key, i))


def config_from_dict(raw: Mapping[str, Any], num_embeddings: int = 20) -> ModelConfig:
    """Build a ModelConfig from the reference's YAML schema (a parsed dict)."""
    _check_field_types(raw)
    image_size = int(raw["data"]["image_size"])
    vae = VaeRef(**{k: v for k, v in raw["vae"].items() if k in VaeRef.__dataclass_fields__})
    if image_size % vae.downsample_ratio:
        raise ValueError(f"image_size {image_size} is not a multiple of {vae.downsample_ratio}")
    sample_size = image_size // vae.downsample_ratio
    model = dict(raw["model"])
    model_type = model.get("model_type", STUDENT_MODEL_TYPE)
    if model_type == STUDENT_MODEL_TYPE:
        unet = _student_unet(model, sample_size, num_embeddings)
    elif model_type == TEACHER_MODEL_TYPE:
        unet = _teacher_unet(model, sample_size, num_embeddings)
    else:
        raise ValueError(
            f"unknown model_type {model_type!r}; expected {STUDENT_MODEL_TYPE} or {TEACHER_MODEL_TYPE}"
        )
    unet = override_levels(unet, model.get("levels"), model.get("mid_level"))
    return ModelConfig(model_type=model_type, image_size=image_size, vae=vae, unet=unet)


def load_config(config: str | os.PathLike | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """Read a reference-style YAML (path or parsed dict); a ModelConfig passes through."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config)
    raw = read_config_file(config)
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise e.in_file(config) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{os.fspath(config)}: {e}") from e


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A model YAML's content, unvalidated but checked to be a mapping."""
    path = os.fspath(path)
    try:
        raw = read_yaml(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model config not found: {path}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with data/vae/model sections")
    return raw


def default_model_config() -> pathlib.Path:
    """The paper's 0.22B student config (configs/moebius.yaml)."""
    return CONFIG_DIR / "moebius.yaml"
