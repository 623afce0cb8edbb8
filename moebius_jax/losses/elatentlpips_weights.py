"""Key maps and loader for the elatentlpips package's two weight files (read without torch).

The package fetches, from the Hugging Face hub repo `Mingguksky/elatentlpips`
(folder `elatentlpips_ckpt/`), two torch files for encoder "sdxl":

* `sdxl_latent_vgg16.pth.tar` (the "trunk file"): `{"state_dict": {"module.model.features.I.*",
  "module.model.classifier.*"}, "best_acc1": ...}`, a latent VGG16-BN classifier checkpoint.
* `sdxl_latest_vgg16_tuned.pth` (the "tuned file"): the metric's whole state dict, trunk
  `net.slice{S}.{I}.*` and heads `lin{k}.model.1.weight` (stored twice, again as `lins.{k}`).

The package loads the tuned file after the trunk file, so the tuned file alone supplies every
value in use; the trunk file is only checked to have the shape the package's strict load
demands. These weights are licensed by their authors, not by moebius-jax, and are never
shipped or downloaded here.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moebius_jax.convert import keymap as km
from moebius_jax.convert.errors import CheckpointError
from moebius_jax.convert.keymap import CONV2D, IDENTITY, KeyMap, LeafRule
from moebius_jax.convert.state_dict import read_state_dict
from moebius_jax.losses.elatentlpips import VGG16_WIDTHS, ELatentLPIPS, ELatentLPIPSNetwork

PathLike = str | os.PathLike

TRUNK_FILE = "sdxl_latent_vgg16.pth.tar"
TUNED_FILE = "sdxl_latest_vgg16_tuned.pth"
HUB_FOLDER = "https://huggingface.co/Mingguksky/elatentlpips/resolve/main/elatentlpips_ckpt/"

WEIGHTS_HELP = (
    "E-LatentLPIPS needs the two weight files of the `elatentlpips` package "
    "(https://github.com/mingukkang/elatentlpips), which that package downloads from the "
    f"Hugging Face hub: {HUB_FOLDER}{TRUNK_FILE} and {HUB_FOLDER}{TUNED_FILE}. They are licensed "
    "separately by their authors (the package is CC BY-NC 4.0, its augmentation code NVIDIA Source "
    "Code License-NC: non-commercial use only); moebius-jax does not ship or download them. If "
    "their licence covers your use, download them yourself and call load_elatentlpips(directory) "
    "or load_elatentlpips(trunk_path, heads_path)."
)

_BN_STATS = (
    LeafRule(r"\.num_batches_tracked$", 0, "batch_stats", "count", IDENTITY, "num_batches_tracked"),
    LeafRule(r"\.running_mean$", 1, "batch_stats", "mean", IDENTITY, "running_mean"),
    LeafRule(r"\.running_var$", 1, "batch_stats", "var", IDENTITY, "running_var"),
)
_CONV_AND_BN = (
    LeafRule(r"\.weight$", 4, "params", "kernel", CONV2D, "weight"),  # 3x3 convs and 1x1 heads
    LeafRule(r"\.weight$", 1, "params", "scale", IDENTITY, "weight"),  # BatchNorm gamma
    LeafRule(r"\.bias$", 1, "params", "bias", IDENTITY, "bias"),
)
_SLICES = frozenset(f"slice{s}" for s in range(1, 6))
_SLICE_BOUNDS = (0, 7, 14, 24, 34, 44)  # torchvision feature indices where each tap's slice starts

# The tuned file: net.slice{S}.{I}.* -> net/slice{S}_{I}; lin{k}.model.1 -> lin{k}. The
# `lins.{k}` duplicates are checked equal to `lin{k}` by the loader and dropped here.
TUNED_KEYMAP = KeyMap(
    rules=(*_BN_STATS, LeafRule(r"^lins\.\d+\.model\.1\.weight$", 4, "params", None), *_CONV_AND_BN),
    containers=_SLICES,
    renames=tuple((f"lin{k}.model.1", f"lin{k}") for k in range(len(VGG16_WIDTHS))),
)

# The trunk file: [module.]model.features.{I}.* is net.slice{S}.{I}.*; the classifier is unused.
TRUNK_KEYMAP = KeyMap(
    rules=(*_BN_STATS, LeafRule(r"^(module\.)?model\.classifier\.", None, "params", None), *_CONV_AND_BN),
    containers=_SLICES,
    aliases=tuple(
        (rf"^(?:module\.)?model\.features\.({'|'.join(map(str, range(lo, hi)))})\.", rf"net.slice{s}.\1.")
        for s, (lo, hi) in enumerate(itertools.pairwise(_SLICE_BOUNDS), start=1)
    ),
)


def abstract_variables(widths: tuple[int, ...] = VGG16_WIDTHS) -> dict[str, Any]:
    """Shapes of the metric's variables (nothing allocated)."""
    x = jnp.zeros((1, 8, 8, 4), jnp.float32)
    return dict(jax.eval_shape(ELatentLPIPSNetwork(widths).init, jax.random.key(0), x, x))


def _check_head_aliases(state: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """`lins.{k}` and `lin{k}` are one tensor in the package; differing copies mean a broken file."""
    twins = {key: "lin" + key.removeprefix("lins.") for key in state if key.startswith("lins.")}
    differ = [key for key, twin in twins.items() if twin in state and not np.array_equal(state[key], state[twin])]
    if differ:
        raise CheckpointError(f"{path}: heads stored twice with different values: {', '.join(differ)}")


def convert_tuned_file(path: PathLike, widths: tuple[int, ...] = VGG16_WIDTHS) -> dict[str, Any]:
    """The tuned file (or a .safetensors with its names) -> host Flax variables."""
    path = pathlib.Path(path)
    state = read_state_dict(path)
    _check_head_aliases(state, path)
    return km.to_flax(state, TUNED_KEYMAP, abstract_variables(widths), str(path))


def check_trunk_file(path: PathLike, widths: tuple[int, ...] = VGG16_WIDTHS) -> None:
    """Raise CheckpointError unless the trunk file holds exactly the trunk, as the package's
    strict load requires (classifier ignored). Its values are superseded by the tuned file's."""
    path = pathlib.Path(path)
    shapes = {key: value.shape for key, value in read_state_dict(path).items()}
    abstract = abstract_variables(widths)
    trunk_only = {collection: {"net": tree["net"]} for collection, tree in abstract.items()}
    km.plan(shapes, TRUNK_KEYMAP, trunk_only, str(path))


def load_elatentlpips(
    trunk_path: PathLike | None = None,
    heads_path: PathLike | None = None,
    *,
    widths: tuple[int, ...] = VGG16_WIDTHS,
) -> ELatentLPIPS:
    """Load E-LatentLPIPS (sdxl) from the package's weight files.

    Either a directory holding both files under their hub names (`load_elatentlpips("ckpt/")`),
    or the two paths (`load_elatentlpips(trunk, tuned)`). The tuned file supplies all values;
    `trunk_path=None` with a `heads_path` skips the (large, otherwise unused) trunk file.
    `widths` exists for reduced-width test files. Without any path, raises FileNotFoundError
    explaining where the weights come from and under which licence.
    """
    if trunk_path is None and heads_path is None:
        raise FileNotFoundError(WEIGHTS_HELP)
    if trunk_path is not None and heads_path is None:
        directory = pathlib.Path(trunk_path)
        if not directory.is_dir():
            raise ValueError(
                f"{directory}: pass a directory holding {TRUNK_FILE} and {TUNED_FILE}, or both file paths"
            )
        trunk_path, heads_path = directory / TRUNK_FILE, directory / TUNED_FILE
    for path in (trunk_path, heads_path):
        if path is not None and not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"{path} not found. {WEIGHTS_HELP}")
    if trunk_path is not None:
        check_trunk_file(trunk_path, widths)
    variables = convert_tuned_file(heads_path, widths)
    return ELatentLPIPS(variables=jax.tree.map(jnp.asarray, variables), widths=tuple(widths))
