"""The registry of what a transformer block can hold: token mixers and feed-forwards, by name.

A block has three slots, each filled by one registered module named in the level's config:
`self_mixer` (`attn1`), `cross_mixer` (`attn2`) and `feed_forward` (`ff`); the two mixer
slots may also be "none". A new mixer is one factory and its registration:

    @register_mixer("self_mixer", "decay")
    def decay(site: MixerSite, init: float = 0.0) -> nn.Module:
        return Decay(init, dtype=site.dtype, name=site.name)

The factory's keyword arguments are the mixer's options, their defaults its defaults: a level
sets them as `mixer_options: {decay: {init: 1.0}}`, and a value of another type than the
default's is refused. `check` (optional) vets a level's configuration before anything is
built. The config validator (`moebius_jax.config`) and the blocks
(`moebius_jax.layers.transformer`) both read this one table.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn

from moebius_jax.layers.attention import Attention
from moebius_jax.layers.cross_lambda import CrossLambda
from moebius_jax.layers.geglu import GEGLUFeedForward
from moebius_jax.layers.gla import GatedLinearAttention
from moebius_jax.layers.linear_attention import LinearAttention
from moebius_jax.layers.mix_ffn import MixFFN
from moebius_jax.layers.self_lambda import SelfLambda

if TYPE_CHECKING:
    from moebius_jax.config import LevelConfig, UNetConfig

NONE = "none"


@dataclasses.dataclass(frozen=True)
class Slot:
    """A place in the block: its module's name, its pre-norm's name (the reference's
    state-dict names) and whether "none" may leave it out (with its norm)."""

    module: str
    norm: str
    optional: bool


SLOTS = {
    "self_mixer": Slot("attn1", "norm1", optional=True),
    "cross_mixer": Slot("attn2", "norm2", optional=True),
    "feed_forward": Slot("ff", "norm3", optional=False),
}


@dataclasses.dataclass(frozen=True)
class MixerSite:
    """What a factory is given: the network and level configs, the level's latent side at
    the trained resolution (position tables are sized by it), and the module name and
    compute dtype the built module must take."""

    network: UNetConfig
    level: LevelConfig
    native_side: int
    name: str
    dtype: Any = None


Factory = Callable[..., nn.Module]  # (site, **options) -> module
Check = Callable[["UNetConfig", "LevelConfig", Mapping[str, Any]], "str | None"]  # -> problem or None


@dataclasses.dataclass(frozen=True)
class Mixer:
    """One registration: the factory, its options' defaults and an optional config check."""

    slot: str
    name: str
    factory: Factory
    defaults: Mapping[str, Any]
    check: Check | None = None

    def options(self, level: LevelConfig) -> dict[str, Any]:
        """The defaults updated with the level's `mixer_options[name]`; ValueError names the option."""
        given = level.mixer_options.get(self.name, {})
        for key, value in given.items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise ValueError(f"mixer_options.{self.name}.{key}: not an option of {self.name} (options: {known})")
            default = self.defaults[key]
            # An int is a fine float; a bool is never an int (YAML reads true as 1 otherwise).
            wanted = (int, float) if type(default) is float else (type(default),)
            mistyped = not isinstance(value, wanted) or isinstance(value, bool) != isinstance(default, bool)
            if default is not None and mistyped:
                raise ValueError(f"mixer_options.{self.name}.{key}={value!r}: expected {type(default).__name__}")
        return {**self.defaults, **given}


_REGISTRY: dict[tuple[str, str], Mixer] = {}


def register_mixer(slot: str, name: str, *, check: Check | None = None) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(site, **options)` as `name` in `slot` (see the module doc)."""
    if slot not in SLOTS:
        raise ValueError(f"register_mixer: slot {slot!r} not one of {tuple(SLOTS)}")
    if name == NONE or (slot, name) in _REGISTRY:
        raise ValueError(f"register_mixer: {slot} {name!r} is taken")

    def register(factory: Factory) -> Factory:
        params = list(inspect.signature(factory).parameters.values())[1:]  # after `site`
        missing = [p.name for p in params if p.default is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"register_mixer {name!r}: options {missing} need defaults")
        _REGISTRY[slot, name] = Mixer(slot, name, factory, {p.name: p.default for p in params}, check)
        return factory

    return register


def mixer_names(slot: str) -> tuple[str, ...]:
    """The names a level may give `slot`, in registration order ("none" last where allowed)."""
    names = tuple(name for s, name in _REGISTRY if s == slot)
    return (*names, NONE) if SLOTS[slot].optional else names


def lookup(slot: str, name: str) -> Mixer | None:
    """The registration for `name` in `slot` (None for "none"); ValueError if there is none."""
    if name == NONE and SLOTS[slot].optional:
        return None
    if (slot, name) not in _REGISTRY:
        raise ValueError(f"{slot}={name!r}: not one of {mixer_names(slot)}")
    return _REGISTRY[slot, name]


def build_mixer(
    slot: str, network: UNetConfig, level: LevelConfig, native_side: int, dtype: Any = None
) -> nn.Module | None:
    """The module the level puts in `slot`, named as the slot's state-dict name; None for "none"."""
    mixer = lookup(slot, getattr(level, slot))
    if mixer is None:
        return None
    site = MixerSite(network, level, native_side, SLOTS[slot].module, dtype)
    return mixer.factory(site, **mixer.options(level))


# --- the built-in mixers ----------------------------------------------------------------


def heads_divide_channels(network: UNetConfig, level: LevelConfig, options: Mapping[str, Any]) -> str | None:
    """The check of every mixer that splits the tokens' channels into the network's heads."""
    if level.channels % network.num_heads:
        return f"channels={level.channels} not divisible by num_heads {network.num_heads}"
    return None


def _check_local_lambda(network: UNetConfig, level: LevelConfig, options: Mapping[str, Any]) -> str | None:
    k = options["kernel_size"]
    if k < 1 or k % 2 == 0:
        return f"kernel_size={k}: must be odd and positive (the position conv keeps the map's size)"
    return heads_divide_channels(network, level, options)


def _check_gla(network: UNetConfig, level: LevelConfig, options: Mapping[str, Any]) -> str | None:
    # The keys are expand_k times as wide as the tokens and split into the same heads.
    key_width = int(level.channels * options["expand_k"])
    if key_width < network.num_heads or key_width % network.num_heads:
        return (f"key width channels*{options['expand_k']:g}={key_width} not divisible by "
                f"num_heads {network.num_heads}")
    return heads_divide_channels(network, level, options)


@register_mixer("self_mixer", "local_lambda", check=_check_local_lambda)
def local_lambda(site: MixerSite, kernel_size: int = 15) -> nn.Module:
    """The student's Local-λ (`kernel_size`: the position conv's side)."""
    return SelfLambda(site.network.num_heads, "local", kernel_size=kernel_size, dtype=site.dtype, name=site.name)


@register_mixer("self_mixer", "global_lambda", check=heads_divide_channels)
def global_lambda(site: MixerSite) -> nn.Module:
    return SelfLambda(site.network.num_heads, "global", table_side=site.native_side, dtype=site.dtype,
                      name=site.name)


@register_mixer("self_mixer", "attention", check=heads_divide_channels)
def self_attention(site: MixerSite) -> nn.Module:
    return Attention(site.network.num_heads, dtype=site.dtype, name=site.name)


@register_mixer("self_mixer", "linear_attention", check=heads_divide_channels)
def linear_attention(site: MixerSite) -> nn.Module:
    return LinearAttention(site.network.num_heads, dtype=site.dtype, name=site.name)


@register_mixer("self_mixer", "gla", check=_check_gla)
def gla(site: MixerSite, expand_k: float = 0.5) -> nn.Module:
    """The teacher's Gated Linear Attention (`expand_k`: key width / token width)."""
    return GatedLinearAttention(num_heads=site.network.num_heads, expand_k=expand_k, dtype=site.dtype,
                                name=site.name)


@register_mixer("cross_mixer", "cross_lambda", check=heads_divide_channels)
def cross_lambda(site: MixerSite) -> nn.Module:
    return CrossLambda(site.network.num_heads, site.native_side, site.network.context_length, dtype=site.dtype,
                       name=site.name)


@register_mixer("cross_mixer", "attention", check=heads_divide_channels)
def cross_attention(site: MixerSite) -> nn.Module:
    return Attention(site.network.num_heads, dtype=site.dtype, name=site.name)


# Hidden widths: int(ff_mult * C) when the level sets ff_mult, else Mix-FFN's network-wide
# mix_mlp_ratio (2.5) and GEGLU's 4.
@register_mixer("feed_forward", "mix_ffn")
def mix_ffn(site: MixerSite) -> nn.Module:
    ratio = site.level.ff_mult or site.network.mix_mlp_ratio
    return MixFFN(int(site.level.channels * ratio), dtype=site.dtype, name=site.name)


@register_mixer("feed_forward", "geglu")
def geglu(site: MixerSite) -> nn.Module:
    return GEGLUFeedForward(site.level.ff_mult or 4, dtype=site.dtype, name=site.name)
