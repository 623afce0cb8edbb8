"""Weight files of the metric networks: where to get them, and their key maps onto Flax.

Nothing is downloaded here (the package runs offline). The user fetches once:
  - pytorch-fid's FID Inception, `pt_inception-2015-12-05-6726825d.pth` (FID_INCEPTION_URL);
  - torchvision's ImageNet AlexNet / VGG16 for the LPIPS backbone (BACKBONE_URLS).
All are read torch-free (legacy or zip torch.save layout, or .safetensors). The LPIPS linear
heads are small and ship with the package (assets/, BSD-2-Clause, see LPIPS_LICENSE.txt).
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from moebius_jax.convert.keymap import CONV2D, IDENTITY, KeyMap, LeafRule, to_flax
from moebius_jax.convert.state_dict import read_state_dict

PathLike = str | os.PathLike

FID_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
LPIPS_HEADS_ASSET = "lpips_heads_v0.1.safetensors"

# Conv weights (OIHW -> HWIO), BatchNorm affine and running statistics. The metric networks
# never train, so num_batches_tracked is dropped (pytorch-fid's file may or may not hold it),
# and so is the unused 1008-class fc.
INCEPTION_KEYMAP = KeyMap(
    rules=(
        LeafRule(r"\.num_batches_tracked$", None, "batch_stats", None),
        LeafRule(r"^fc\.", None, "params", None),
        LeafRule(r"\.running_mean$", 1, "batch_stats", "mean", IDENTITY, "running_mean"),
        LeafRule(r"\.running_var$", 1, "batch_stats", "var", IDENTITY, "running_var"),
        LeafRule(r"\.weight$", 4, "params", "kernel", CONV2D, "weight"),
        LeafRule(r"\.weight$", 1, "params", "scale", IDENTITY, "weight"),
        LeafRule(r"\.bias$", 1, "params", "bias", IDENTITY, "bias"),
    ),
    containers=frozenset(),
)

# torchvision `features.<i>.{weight,bias}` <-> Flax `features_<i>`; the ImageNet classifier
# in the same file is not part of LPIPS.
LPIPS_BACKBONE_KEYMAP = KeyMap(
    rules=(
        LeafRule(r"^classifier\.", None, "params", None),
        LeafRule(r"^features\.\d+\.weight$", 4, "params", "kernel", CONV2D, "weight"),
        LeafRule(r"^features\.\d+\.bias$", 1, "params", "bias", IDENTITY, "bias"),
    ),
    containers=frozenset({"features"}),
)

# lpips `lin<L>.model.1.weight` (1, C, 1, 1) <-> Flax `lin_<L>` 1x1 conv; index 0 of lpips's
# Sequential is the (inactive) Dropout, hence ".model.1".
LPIPS_HEADS_KEYMAP = KeyMap(
    rules=(LeafRule(r"^lin\d\.model\.1\.weight$", 4, "params", "kernel", CONV2D, "weight"),),
    containers=frozenset(),
    renames=tuple((f"lin{i}.model.1", f"lin_{i}") for i in range(5)),
)


def _require_file(path: PathLike | None, what: str, url: str) -> pathlib.Path:
    """The path as a Path, or a FileNotFoundError saying where the file comes from."""
    where = "no path was given" if path is None else f"{os.fspath(path)} does not exist"
    if path is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(
            f"{what} not found ({where}). Download it once from {url} and pass its path; "
            "it is read without torch."
        )
    return pathlib.Path(path)


def fid_inception_variables(path: PathLike | None, target: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` as variables shaped like `target`
    (the FIDInceptionV3 variable tree or its shapes). Every key and shape is checked."""
    path = _require_file(path, "The FID Inception weights (pytorch-fid)", FID_INCEPTION_URL)
    return to_flax(read_state_dict(path), INCEPTION_KEYMAP, target, str(path))


def lpips_variables(
    net: str, target: Mapping[str, Any], backbone_path: PathLike | None, heads_path: PathLike | None = None
) -> dict[str, Any]:
    """LPIPSNet variables: the torchvision backbone file plus the v0.1 heads (bundled copy, or
    lpips's own `weights/v0.1/<net>.pth` when `heads_path` is given)."""
    if net not in BACKBONE_URLS:
        raise ValueError(f"unknown LPIPS network {net!r}; expected one of {tuple(BACKBONE_URLS)}")
    name = {"alex": "AlexNet", "vgg": "VGG16"}[net]
    backbone_path = _require_file(
        backbone_path, f"The LPIPS-{net} backbone (torchvision ImageNet {name})", BACKBONE_URLS[net]
    )
    params = target["params"]
    backbone = to_flax(
        read_state_dict(backbone_path),
        LPIPS_BACKBONE_KEYMAP,
        {"params": {k: v for k, v in params.items() if k.startswith("features_")}},
        str(backbone_path),
    )
    if heads_path is None:
        with importlib.resources.as_file(importlib.resources.files("moebius_jax") / "assets" / LPIPS_HEADS_ASSET) as p:
            bundled = read_state_dict(p)
        prefix = f"{net}."  # the bundled file holds both nets' heads under "<net>.lin<L>..."
        heads_state: dict[str, np.ndarray] = {k[len(prefix):]: v for k, v in bundled.items() if k.startswith(prefix)}
        source = f"{LPIPS_HEADS_ASSET} ({net})"
    else:
        heads_state, source = read_state_dict(heads_path), str(heads_path)
    heads = to_flax(
        heads_state, LPIPS_HEADS_KEYMAP, {"params": {k: v for k, v in params.items() if k.startswith("lin_")}}, source
    )
    return {"params": {**backbone["params"], **heads["params"]}}
