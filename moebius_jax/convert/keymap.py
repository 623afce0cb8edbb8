"""Declarative PyTorch <-> Flax key maps.

A key map is data: a table of leaf rules (which torch parameter kind becomes which Flax
leaf, with which layout transform), literal module renames, and the names of torch's
indexed containers (`down_blocks.0` <-> `down_blocks_0`). The same table converts in both
directions; `to_flax` checks every key and shape against the model's own variable tree and
reports all problems in one error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from moebius_jax.convert.errors import CheckpointMismatchError


@dataclasses.dataclass(frozen=True)
class Layout:
    """A pair of inverse array transforms: torch layout -> Flax layout and back."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Layout("identity", lambda a: a, lambda a: a)
LINEAR = Layout("linear (out, in) -> (in, out)", lambda a: a.T, lambda a: a.T)
CONV2D = Layout(
    "conv OIHW -> HWIO", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)
)
# The lambda layer's Conv3d (d_k, 1, 1, kh, kw) acts as a 2-D conv per value channel.
CONV3D_DEPTH1 = Layout(
    "conv3d (O, 1, 1, kh, kw) -> HWIO",
    lambda a: a[:, :, 0].transpose(2, 3, 1, 0),
    lambda a: a.transpose(3, 2, 0, 1)[:, :, None],
)


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """Torch keys matching `pattern` (regex, searched) with `ndim` dims (None: any) map to
    Flax leaf `leaf` in `collection`, converted with `layout`. `leaf=None` drops the key."""

    pattern: str
    ndim: int | None
    collection: str
    leaf: str | None
    layout: Layout = IDENTITY
    torch_leaf: str = ""  # the torch leaf name this rule reads (for the inverse direction)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Everything needed to move one model's weights between torch and Flax naming."""

    rules: tuple[LeafRule, ...]
    containers: frozenset[str]
    renames: tuple[tuple[str, str], ...] = ()  # (torch module path part, flax module path part)
    aliases: tuple[tuple[str, str], ...] = ()  # one-way torch -> torch renames (legacy names)

    # -- torch -> flax -------------------------------------------------------------------
    def torch_to_flax_path(self, key: str, ndim: int) -> tuple[tuple[str, ...], LeafRule] | None:
        """(collection, *module path, leaf) for a torch key, or None if the rule drops it."""
        key = self.canonical_torch_key(key)
        rule = self._rule_for(key, ndim)
        if rule.leaf is None:
            return None
        module = key.rsplit(".", 1)[0] if "." in key else ""
        for torch_part, flax_part in self.renames:
            module = _replace_part(module, torch_part, flax_part)
        parts = _join_indices(module.split("."), self.containers) if module else []
        return (rule.collection, *parts, rule.leaf), rule

    def canonical_torch_key(self, key: str) -> str:
        for old, new in self.aliases:
            key = re.sub(old, new, key)
        return key

    def _rule_for(self, key: str, ndim: int) -> LeafRule:
        for rule in self.rules:
            if (rule.ndim is None or rule.ndim == ndim) and re.search(rule.pattern, key):
                return rule
        raise KeyError(f"no key-map rule for {key!r} ({ndim}-D)")

    # -- flax -> torch -------------------------------------------------------------------
    def flax_to_torch_key(self, path: tuple[str, ...], ndim: int) -> tuple[str, Layout]:
        """The torch key and layout for one Flax leaf, derived from the same table."""
        collection, *module, leaf = path
        parts = []
        for part in module:
            m = re.fullmatch(r"(.+)_(\d+)", part)
            if m and m.group(1) in self.containers:
                parts += [m.group(1), m.group(2)]
            else:
                parts.append(part)
        module_key = ".".join(parts)
        for torch_part, flax_part in self.renames:
            module_key = _replace_part(module_key, flax_part, torch_part)
        candidates = [
            r for r in self.rules if r.leaf == leaf and r.collection == collection and r.torch_leaf
        ]
        for rule in candidates:
            key = f"{module_key}.{rule.torch_leaf}" if module_key else rule.torch_leaf
            torch_ndim = ndim if rule.ndim is None else rule.ndim
            if rule.layout.to_flax(_shape_probe((1,) * torch_ndim)).ndim != ndim:
                continue
            try:  # a rule applies only if the forward direction sends that key back here
                back = self.torch_to_flax_path(key, torch_ndim)
            except KeyError:
                continue
            if back is not None and back[0] == tuple(path) and back[1] is rule:
                return key, rule.layout
        raise KeyError(f"no torch name for Flax leaf {'/'.join(path)} ({ndim}-D)")


def _replace_part(path: str, old: str, new: str) -> str:
    """Replace a dotted sub-path as whole components only."""
    return re.sub(rf"(^|\.){re.escape(old)}(?=\.|$)", lambda m: m.group(1) + new, path)


def _join_indices(parts: list[str], containers: frozenset[str]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part.isdigit() and out and out[-1] in containers:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return out


def _shape_probe(shape: tuple[int, ...]) -> np.ndarray:
    """A zero-strided stand-in array: layouts are views, so checking shapes allocates nothing."""
    return np.broadcast_to(np.zeros((), np.uint8), shape)


def plan(
    shapes: Mapping[str, tuple[int, ...]],
    keymap: KeyMap,
    target: Mapping[str, Any],
    source: str,
    *,
    optional: Iterable[str] = (),
) -> dict[tuple[str, ...], tuple[str, Layout]]:
    """Match torch keys (with their shapes) to the leaves of `target`; no data is touched.

    Every problem is collected and raised once as CheckpointMismatchError: torch keys with
    no place in the model (unexpected), model leaves the file lacks (missing, with their
    expected torch shape) and shape mismatches (torch names, torch layouts). Leaves of
    collections listed in `optional` may be absent.
    """
    flat_target = traverse_util.flatten_dict(dict(target))
    matched: dict[tuple[str, ...], tuple[str, Layout]] = {}
    unexpected, mismatched = [], []
    for key, shape in shapes.items():
        shape = tuple(shape)
        try:
            mapped = keymap.torch_to_flax_path(key, len(shape))
        except KeyError:
            unexpected.append((key, shape))
            continue
        if mapped is None:
            continue
        path, rule = mapped
        if path not in flat_target:
            unexpected.append((key, shape))
            continue
        want = tuple(flat_target[path].shape)
        if rule.layout.to_flax(_shape_probe(shape)).shape != want:
            torch_want = rule.layout.to_torch(_shape_probe(want)).shape
            mismatched.append((key, torch_want, shape))
        matched[path] = (key, rule.layout)
    missing = []
    optional = set(optional)
    for path, leaf in flat_target.items():
        if path in matched or path[0] in optional:
            continue
        try:
            key, layout = keymap.flax_to_torch_key(path, len(leaf.shape))
            shape = layout.to_torch(_shape_probe(tuple(leaf.shape))).shape
        except KeyError:
            key, shape = "/".join(path), tuple(leaf.shape)
        missing.append((key, tuple(shape)))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    return matched


def to_flax(
    state: Mapping[str, np.ndarray],
    keymap: KeyMap,
    target: Mapping[str, Any],
    source: str,
    *,
    dtype: Any = np.float32,
    optional: Iterable[str] = (),
) -> dict[str, Any]:
    """Convert a torch state dict onto the structure of `target` (variables or their shapes).

    Floating leaves become `dtype`; integer leaves (BatchNorm counts) keep the target's dtype.
    Raises CheckpointMismatchError listing every problem (see `plan`).
    """
    arrays = {key: np.asarray(value) for key, value in state.items()}
    matched = plan({k: v.shape for k, v in arrays.items()}, keymap, target, source, optional=optional)
    flat_target = traverse_util.flatten_dict(dict(target))
    result = {}
    for path, (key, layout) in matched.items():
        target_dtype = np.dtype(flat_target[path].dtype)
        cast = dtype if np.issubdtype(target_dtype, np.floating) else target_dtype
        result[path] = np.array(layout.to_flax(arrays[key]), dtype=cast, order="C")  # keeps 0-d
    return traverse_util.unflatten_dict(result)


def to_torch(variables: Mapping[str, Any], keymap: KeyMap) -> dict[str, np.ndarray]:
    """Flax variables -> torch state dict (names and layouts the reference loads)."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        value = np.asarray(value)
        key, layout = keymap.flax_to_torch_key(path, value.ndim)
        out[key] = np.array(layout.to_torch(value), order="C")
    return out
