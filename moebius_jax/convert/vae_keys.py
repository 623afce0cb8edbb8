"""VAE key maps: diffusers names (current and legacy) and the CompVis/LDM single-file layout.

Three namings of the same 248 SD-VAE tensors exist in the wild:
  * current diffusers (`encoder.mid_block.attentions.0.to_q.weight`) — `VAE_KEYMAP`'s own names;
  * legacy diffusers, before the attention refactor (`...attentions.0.query.weight`) — read
    through the key map's aliases;
  * original CompVis/LDM (`encoder.mid.attn_1.q.weight`, decoder levels numbered in reverse,
    attention projections stored as 1x1 convs), alone or inside a whole SD checkpoint under
    `first_stage_model.` — rewritten to current diffusers names by `ldm_to_diffusers`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from moebius_jax.convert.keymap import KeyMap
from moebius_jax.convert.maps import GENERIC_RULES

# Legacy diffusers attention names -> current names (older diffusers VAE files use these).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

VAE_KEYMAP = KeyMap(
    rules=GENERIC_RULES,  # convs, linears, GroupNorm scales and biases: nothing VAE-specific
    containers=frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers"}),
    renames=(("to_out.0", "to_out"),),  # diffusers' (Linear, Dropout) container; ours is the Linear
    aliases=tuple(
        (rf"(\.mid_block\.attentions\.\d+)\.{old}\.", rf"\1.{new}.") for old, new in LEGACY_ATTENTION_NAMES.items()
    ),
)

# A whole SD checkpoint keeps its VAE under one of these prefixes (other keys are not the VAE's).
WHOLE_CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")
# The VAE's own top-level modules; an LDM file may also hold training leftovers (`loss.*`, ...).
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_LDM_MARKER = re.compile(r"^(encoder|decoder)\.(down|up|mid)\.")
# After renaming: the attention projections, which LDM stores as 1x1 convs (C, C, 1, 1).
_ATTENTION_PROJECTION = re.compile(r"\.mid_block\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$")

Rename = tuple[str, str | Callable[[re.Match[str]], str]]  # (regex, re.sub replacement)


def ldm_renames(num_levels: int) -> tuple[Rename, ...]:
    """LDM -> diffusers name rewrites, as (regex, replacement); each key gets every matching one.

    LDM numbers the decoder's levels by resolution (`up.0` = full size), diffusers in the
    order they run (`up_blocks.0` = lowest resolution): index i <-> num_levels - 1 - i.
    """
    last = num_levels - 1
    return (
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{last - int(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{last - int(m[1])}.upsamplers.0."),
        (r"\.mid\.block_(\d+)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    )


def is_ldm_layout(keys: Iterable[str]) -> bool:
    """Whether the names are CompVis/LDM ones (`encoder.down.0...`, `decoder.mid...`)."""
    return any(_LDM_MARKER.match(key) for key in keys)


def strip_checkpoint_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The VAE part of a whole SD checkpoint, prefix removed; any other state dict unchanged."""
    for prefix in WHOLE_CHECKPOINT_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return dict(state)


def ldm_to_diffusers(state: Mapping[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """Rename an LDM VAE state dict to current diffusers names; 1x1-conv projections become Linear.

    Keys outside the VAE's modules (`loss.*`, EMA counters) are dropped: LDM files are
    training checkpoints. A key no rule covers keeps its name (and is reported as unexpected).
    """
    renames = ldm_renames(num_levels)
    out = {}
    for key, value in state.items():
        if not key.startswith(VAE_ROOTS):
            continue
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if _ATTENTION_PROJECTION.search(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def normalise_vae_state(state: Mapping[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """Any supported VAE state dict -> names `VAE_KEYMAP` reads (legacy names are its aliases)."""
    state = strip_checkpoint_prefix(state)
    return ldm_to_diffusers(state, num_levels) if is_ldm_layout(state) else state
