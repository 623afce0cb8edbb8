"""Weight transplant for architecture surgery: initialise a variant from a checkpoint wherever
names and shapes match, and report what was copied, what was re-initialised and why.

    python -m moebius_jax.transplant SOURCE TARGET_CONFIG [--seed 0] [--out DIR] [--list-copied]

SOURCE is the reference's `.bin` / `.safetensors` (torch names, mapped through the same key
table as the loaders), an EMA `.bin` (BatchNorm statistics from the plain file beside it when
there is one), a `moebius_jax.convert` directory (with its config.yaml), or, from Python, Flax
variables. Tensors are matched by Flax path and shape only: a 1x1 conv kernel never fills a
dense kernel of the same map, so a replaced mixer starts from its own initialiser.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moebius_jax import cli
from moebius_jax.config import ModelConfig, load_config
from moebius_jax.convert import keymap as km
from moebius_jax.convert.errors import CheckpointError
from moebius_jax.convert.maps import UNET_KEYMAP
from moebius_jax.convert.orbax_io import CONFIG_FILE, VARIABLES_DIR, is_orbax_dir, save_variables
from moebius_jax.convert.state_dict import is_ema_file, read_ema_file, read_state_dict
from moebius_jax.errors import read_yaml
from moebius_jax.inspect_model import module_group
from moebius_jax.io_safety import prepare_output_dir
from moebius_jax.loading import BN_STAT_SUFFIXES, dummy_inputs, ema_sibling, load_model
from moebius_jax.models.removal_model import RemovalModel

Path = tuple[str, ...]


def _name(path: Path) -> str:
    return "/".join(path)


@dataclasses.dataclass(frozen=True)
class TransplantReport:
    """Every target tensor is either copied or re-initialised (missing from the source, or there
    with another shape); every source tensor is either copied or unused. Names are Flax paths
    (`params/diff_model/...`); unmappable torch keys are shown as `torch:<key>`."""

    source: str
    copied: tuple[tuple[str, tuple[int, ...]], ...]
    missing: tuple[tuple[str, tuple[int, ...]], ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, source shape, target shape)
    unused: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def reinitialised(self) -> tuple[str, ...]:
        return tuple(sorted([n for n, _ in self.missing] + [n for n, _, _ in self.mismatched]))

    def format(self, list_copied: bool = False) -> str:
        """Counts, copied tensors by module, then every re-initialised and unused tensor."""
        values = sum(math.prod(s) for _, s in self.copied)
        lines = [
            f"transplant from {self.source}",
            f"  copied bit-exact : {len(self.copied):5d} tensors ({values:,d} values)",
            f"  re-initialised   : {len(self.missing) + len(self.mismatched):5d} tensors "
            f"({len(self.missing)} missing from the source, {len(self.mismatched)} with another shape)",
            f"  unused in source : {len(self.unused):5d} tensors",
        ]
        by_module: dict[str, int] = {}
        for name, _ in self.copied:
            group = module_group(tuple(name.split("/")[1:]))[0]
            by_module[group] = by_module.get(group, 0) + 1
        lines += ["", "copied, by module:"] + [f"  {g:30s} {n:5d}" for g, n in sorted(by_module.items())]
        if list_copied:
            lines += [f"    {n}  {s}" for n, s in self.copied]
        sections = (
            ("re-initialised, not in the source:", [f"  {n}  {s}" for n, s in self.missing]),
            ("re-initialised, shape differs (source -> target):",
             [f"  {n}  {a} -> {b}" for n, a, b in self.mismatched]),
            ("unused source tensors:", [f"  {n}  {s}" for n, s in self.unused]),
        )
        for title, entries in sections:
            if entries:
                lines += ["", title, *entries]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _from_torch_state(state: Mapping[str, np.ndarray], keymap: km.KeyMap) -> tuple[dict[Path, np.ndarray], list]:
    """Torch names and layouts -> Flax paths and layouts; keys the table cannot place are returned apart."""
    flat, unplaced = {}, []
    for key, value in state.items():
        value = np.asarray(value)
        try:
            mapped = keymap.torch_to_flax_path(key, value.ndim)
        except KeyError:
            unplaced.append((f"torch:{key}", tuple(value.shape)))
            continue
        if mapped is not None:
            path, rule = mapped
            flat[path] = np.asarray(rule.layout.to_flax(value))
    return flat, unplaced


def _read_source(source: Any, keymap: km.KeyMap) -> tuple[dict[Path, np.ndarray], list, str]:
    """(flat Flax-path arrays, unplaceable torch keys, description) for any supported source."""
    if isinstance(source, Mapping):
        flat = traverse_util.flatten_dict(dict(jax.device_get(dict(source))))
        return {p: np.asarray(v) for p, v in flat.items()}, [], "Flax variables"
    path = pathlib.Path(source)
    if path.is_dir():
        if not (is_orbax_dir(path) and (path / CONFIG_FILE).exists()):
            raise CheckpointError(f"{path}: not a moebius_jax.convert directory with a {CONFIG_FILE}")
        # The directory names its own architecture.
        _, variables = load_model(path / CONFIG_FILE, path)
        flat, _, _ = _read_source(variables, keymap)
        return flat, [], str(path)
    if not path.exists():
        raise FileNotFoundError(f"transplant source not found: {path}")
    if not is_ema_file(path):
        return (*_from_torch_state(read_state_dict(path), keymap), str(path))
    # EMA files hold parameters only; the plain checkpoint beside them holds the statistics.
    state = dict(read_ema_file(path).params)
    plain = ema_sibling(path)
    if plain.exists():
        state.update({k: v for k, v in read_state_dict(plain).items() if k.endswith(BN_STAT_SUFFIXES)})
    return (*_from_torch_state(state, keymap), str(path))


def _target_model(target: RemovalModel | ModelConfig | str | os.PathLike | Mapping) -> RemovalModel:
    if isinstance(target, RemovalModel):
        return target
    return RemovalModel(load_config(target).unet)


def transplant(
    source: Mapping[str, Any] | str | os.PathLike,
    target: RemovalModel | ModelConfig | str | os.PathLike | Mapping,
    key: jax.Array,
    keymap: km.KeyMap = UNET_KEYMAP,
) -> tuple[dict[str, Any], TransplantReport]:
    """Variables for `target` (a model, or any config `load_config` reads): every tensor whose
    path and shape the source also has is the source's, bit for bit (cast to the target's
    dtype); every other one is what a fresh init from `key` gives it. Returns (variables, report)."""
    model = _target_model(target)
    inputs = dummy_inputs(model.config)
    shapes = traverse_util.flatten_dict(dict(jax.eval_shape(model.init, key, *inputs)))
    source_flat, unplaced, description = _read_source(source, keymap)

    copied, missing, mismatched, fresh_paths = [], [], [], []
    for path, leaf in shapes.items():
        shape = tuple(leaf.shape)
        donor = source_flat.get(path)
        if donor is not None and tuple(donor.shape) == shape:
            copied.append((_name(path), shape))
            continue
        fresh_paths.append(path)
        if donor is None:
            missing.append((_name(path), shape))
        else:
            mismatched.append((_name(path), tuple(donor.shape), shape))
    unused = [(_name(p), tuple(v.shape)) for p, v in source_flat.items() if p not in shapes] + unplaced

    def init_fresh(key: jax.Array) -> dict[Path, jax.Array]:
        # The full init, of which only the re-initialised leaves are returned: XLA drops the
        # rest (and the forward pass), so compiling this costs a fraction of compiling init,
        # and the values are exactly those a full init from `key` gives.
        flat = traverse_util.flatten_dict(dict(model.init(key, *inputs)))
        return {p: flat[p] for p in fresh_paths}

    merged = dict(jax.jit(init_fresh)(key)) if fresh_paths else {}
    for path, leaf in shapes.items():
        if path not in merged:
            merged[path] = jnp.asarray(source_flat[path].astype(leaf.dtype, copy=False))
    report = TransplantReport(description, tuple(copied), tuple(missing), tuple(mismatched), tuple(unused))
    return traverse_util.unflatten_dict(merged), report


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m moebius_jax.transplant", description=__doc__)
    parser.add_argument("source", help=".bin / .safetensors / .EMA.bin, or a moebius_jax.convert directory")
    parser.add_argument("config", help="the variant's model YAML")
    parser.add_argument("--seed", type=int, default=0, help="initialiser seed for re-initialised tensors")
    parser.add_argument("--out", help="write the variables and config here (a directory load_model reads): "
                                      "new, empty, or an earlier transplant's")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output in --out")
    parser.add_argument("--list-copied", action="store_true", help="list every copied tensor too")
    args = parser.parse_args(argv)
    if args.out:
        prepare_output_dir(args.out, "--out", marker=VARIABLES_DIR, writes=[CONFIG_FILE],
                           inputs=[args.source, args.config], overwrite=args.overwrite)
    load_config(args.config)  # a bad variant config is reported before the source is read
    variables, report = transplant(args.source, args.config, jax.random.key(args.seed))
    print(report.format(list_copied=args.list_copied))
    if args.out:
        print(f"wrote {save_variables(args.out, variables, read_yaml(args.config), overwrite=args.overwrite)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
