"""Accounting for a model config: parameters per module, FLOPs and activation memory of one
classifier-free-guidance step, and a validity check.

    python -m moebius_jax.inspect_model CONFIG [--resolution 512 | HxW] [--batch B] [--no-flops] [--no-compile] [--train]
    python -m moebius_jax.inspect_model CONFIG --target tpu:v5e:2x2 [--dtype bfloat16]

Nothing is allocated: parameter shapes come from `jax.eval_shape`; FLOPs from XLA's cost
analysis of the lowered program on abstract inputs (with loop bodies, e.g. GLA's chunk scan,
counted once per iteration, which XLA's analysis does not do); activation memory from the
compiled program's buffer assignment (`memory_analysis`, for the backend JAX runs on: the
CPU figure is an estimate of what an accelerator needs). One CFG step is one forward at batch
2B (conditional and unconditional halves), as the sampler runs it. Per-module FLOPs come from
lowering each report row's modules alone on the shapes they see in the full forward.

`--target` (`tpu:<topology>` with the `tpu` extra, or `gpu`) also compiles each row's modules
alone for one chip of the target, weights as the sampler's loop reads them (`cast_weights`),
and the whole CFG step: per row the target compiler's flops and bytes accessed, the roofline
time they set on that chip and whether memory or compute bounds it, so a memory-bound mixer
shows (`moebius_jax.aot`). Identical modules at identical shapes compile once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from moebius_jax import aot, cli
from moebius_jax.config import ModelConfig, load_config
from moebius_jax.dtypes import DTYPES
from moebius_jax.errors import UserError
from moebius_jax.layers.linear import cast_weights
from moebius_jax.models.removal_model import RemovalModel

# Blocks whose children are reported one kind at a time (attentions / resnets / samplers),
# as the Moebius paper's parameter table groups them.
_SPLIT_BLOCKS = ("down_blocks_", "up_blocks_", "mid_block")


def module_group(path: Sequence[str]) -> tuple[str, int]:
    """Report row of a variable or module path, and how many leading parts form the row's root.

    ("diff_model", "down_blocks_1", "resnets_0", ...) -> ("down_blocks.1.resnets", 3);
    ("embedding_layer", ...) -> ("embedding_layer", 1); ("diff_model", "conv_in", ...) -> ("conv_in", 2).
    """
    if path[0] != "diff_model":
        return path[0], 1
    if len(path) == 1:
        return "diff_model", 2  # the UNet as a whole: not a row of its own
    head = path[1]
    if head.startswith(_SPLIT_BLOCKS):
        block = _dotted(head)
        return (f"{block}.{path[2].rsplit('_', 1)[0]}" if len(path) > 2 else block), 3
    return _dotted(head), 2


def _dotted(part: str) -> str:
    """down_blocks_1 -> down_blocks.1 (the reference's spelling)."""
    stem, _, index = part.rpartition("_")
    return f"{stem}.{index}" if index.isdigit() and stem else part


@dataclasses.dataclass(frozen=True)
class TargetCost:
    """A target compiler's figures for one chip: flops, bytes accessed and (TPU) the part of them
    in HBM, summed over a row's modules, and the rooflines they set (`aot.Chip.roofline`)."""

    flops: float
    bytes_accessed: float
    chip: aot.Chip | None
    hbm_bytes: float | None = None

    @classmethod
    def of(cls, report: aot.CompileReport) -> TargetCost:
        return cls(report.flops, report.bytes_accessed, report.chip, report.hbm_bytes)

    def __add__(self, other: TargetCost) -> TargetCost:
        hbm = None if self.hbm_bytes is None or other.hbm_bytes is None else self.hbm_bytes + other.hbm_bytes
        return TargetCost(self.flops + other.flops, self.bytes_accessed + other.bytes_accessed, self.chip, hbm)

    @property
    def roofline(self) -> tuple[float, str] | None:
        return None if self.chip is None else self.chip.roofline(self.flops, self.bytes_accessed)

    @property
    def hbm_roofline(self) -> tuple[float, str] | None:
        return None if self.chip is None or self.hbm_bytes is None else self.chip.roofline(self.flops, self.hbm_bytes)


@dataclasses.dataclass(frozen=True)
class ModuleRow:
    """One report row: trained parameters, BatchNorm statistics, forward FLOPs (None: not
    measured), and with a target its compiler's figures for the row's modules."""

    name: str
    params: int
    stats: int
    flops: float | None = None
    on_target: TargetCost | None = None


@dataclasses.dataclass(frozen=True)
class StepCost:
    """XLA's estimate for one program: FLOPs, and the sizes of its buffers once compiled."""

    flops: float
    temp_bytes: int | None  # activations and scratch (None: not compiled)
    argument_bytes: int | None  # weights and inputs


@dataclasses.dataclass(frozen=True)
class Inspection:
    """Everything `inspect_model` found; `format_report` prints it."""

    config: ModelConfig
    latent_hw: tuple[int, int]
    images: int  # B: the CFG forward runs 2B rows
    rows: tuple[ModuleRow, ...]
    cfg_step: StepCost | None = None
    train_step: StepCost | None = None
    target_step: aot.CompileReport | None = None  # the whole CFG step compiled for the target

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def stats(self) -> int:
        return sum(r.stats for r in self.rows)


def _abstract_inputs(config: ModelConfig, hw: tuple[int, int], batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    unet = config.unet
    return (
        jax.ShapeDtypeStruct((batch, *hw, unet.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, unet.context_length), jnp.int32),
    )


def _is_row_root(path: tuple[str, ...]) -> bool:
    """Whether a module at `path` is where a report row starts (its calls are the row's cost)."""
    return bool(path) and len(path) == module_group(path)[1]


def _traced_variables(config: ModelConfig, dtype: Any = None) -> tuple[RemovalModel, dict[str, Any], list[str]]:
    """The model (computing in `dtype`), the shapes of all its variables (no allocation) and
    the report rows in call order."""
    model = RemovalModel(config.unet, dtype=dtype)
    side = config.unet.sample_size
    order: dict[str, None] = {}

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.scope.path) if context.module.scope else ()
        if _is_row_root(path):
            order.setdefault(module_group(path)[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(model.init, jax.random.key(0), *_abstract_inputs(config, (side, side), 1))
    return model, dict(variables), list(order)


def count_parameters(config: str | os.PathLike | Mapping | ModelConfig) -> int:
    """Trained parameters of a config (BatchNorm statistics excluded), from shapes only."""
    _, variables, _ = _traced_variables(load_config(config))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))


def _sizes_by_group(tree: Mapping[str, Any]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
        name = module_group(path)[0]
        sizes[name] = sizes.get(name, 0) + math.prod(leaf.shape)
    return sizes


def xla_cost(fn: Any, *args: Any, compile_it: bool = True) -> StepCost:
    """FLOPs of `fn(*args)` (abstract args) from XLA's cost analysis of the lowered program, loops
    counted per iteration; with `compile_it`, the compiled program's buffer sizes too."""
    traced = jax.jit(fn).trace(*args)
    flops = aot.model_flops(traced)
    if not compile_it:
        return StepCost(flops, None, None)
    memory = traced.lower().compile().memory_analysis()
    return StepCost(flops, getattr(memory, "temp_size_in_bytes", None), getattr(memory, "argument_size_in_bytes", None))


def _subtree(variables: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for collection, tree in variables.items():
        for part in path:
            tree = tree.get(part) if isinstance(tree, Mapping) else None
        if tree is not None:
            out[collection] = tree
    return out


def _group_costs(model: RemovalModel, variables: Mapping[str, Any], inputs: tuple, target: str | None = None
                 ) -> tuple[dict[str, float], dict[str, TargetCost]]:
    """Forward FLOPs of each report row: trace the full forward once, recording the arguments
    every row's root module is called with, then lower each root alone on those shapes; with
    a `target`, also compile each root for one of its chips (`TargetCost` per row)."""
    calls: dict[tuple[str, ...], tuple[nn.Module, tuple, dict]] = {}

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.scope.path) if context.module.scope else ()
        if context.method_name == "__call__" and _is_row_root(path):
            calls.setdefault(path, (context.module.clone(parent=None), args, kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, *x: model.apply(v, *x).sample, variables, *inputs)

    flops: dict[str, float] = {}
    on_target: dict[str, TargetCost] = {}
    compiled: dict[str, TargetCost] = {}  # identical modules at identical shapes compile once
    if target is not None:
        from tqdm import tqdm

        chip = aot.single_device(target)
        # Weights as a sampler's loop reads them: matrices cast once to the compute dtype.
        stored = jax.eval_shape(lambda v: cast_weights(v, model.dtype), variables)
        items = tqdm(calls.items(), desc=f"compiling each module for {target}", unit="module", file=sys.stderr)
    else:
        items = calls.items()
    for path, (module, args, kwargs) in items:
        # Arrays become abstract arguments; the rest (map sizes, train flags) stays static.
        leaves, treedef = jax.tree.flatten((args, kwargs))
        arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
        dynamic = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in arrays]
        replay = _replay(module, leaves, treedef, arrays)
        cost = xla_cost(replay, _subtree(variables, path), dynamic, compile_it=False)
        name = module_group(path)[0]
        flops[name] = flops.get(name, 0.0) + cost.flops
        if target is not None:
            weights = _subtree(stored, path)
            key = repr((module, jax.tree.map(lambda x: (x.shape, x.dtype), (weights, dynamic))))
            if key not in compiled:
                report, _ = aot.compile_report(replay, aot.abstract(weights, chip), aot.abstract(dynamic, chip),
                                               name=name, target=target)
                compiled[key] = TargetCost.of(report)
            on_target[name] = on_target[name] + compiled[key] if name in on_target else compiled[key]
    return flops, on_target


def _replay(module: nn.Module, leaves: list, treedef: Any, arrays: list[int]) -> Any:
    """`module.apply(variables, *args, **kwargs)` of a recorded call, its array leaves as arguments."""

    def run(variables: Mapping[str, Any], dynamic: list[jax.Array]) -> Any:
        filled = list(leaves)
        for i, value in zip(arrays, dynamic):
            filled[i] = value
        args, kwargs = jax.tree.unflatten(treedef, filled)
        return module.apply(variables, *args, **kwargs)

    return run


def _train_step_cost(model: RemovalModel, variables: Mapping[str, Any], inputs: tuple) -> StepCost:
    """Forward + backward of a mean-squared loss in train mode (BatchNorm on batch statistics)."""

    def loss(params, stats, *x):
        out, _ = model.apply({"params": params, **stats}, *x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out.sample))

    stats = {k: v for k, v in variables.items() if k != "params"}
    return xla_cost(jax.grad(loss), variables["params"], stats, *inputs)


def inspect_model(
    config: str | os.PathLike | Mapping | ModelConfig,
    resolution: int | tuple[int, int] = 512,
    images: int = 1,
    flops: bool = True,
    compile_it: bool = True,
    train: bool = False,
    target: str | None = None,
    dtype: str = "float32",
) -> Inspection:
    """Account for `config` at `resolution` (image pixels, side or (H, W)) for `images` per CFG step.

    Raises ValueError (from the config check, or for a resolution the network cannot run at).
    `compile_it=False` skips compiling: FLOPs only, no memory figures. `target`: also compile
    each row's modules and the CFG step for one chip of it (see the module docstring), at the
    compute `dtype`.
    """
    cfg = load_config(config)
    if images < 1:
        raise UserError(f"batch {images}: need at least one image per step")
    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    ratio, depth = cfg.vae.downsample_ratio, 2 ** (len(cfg.unet.levels) - 1)
    if any(side % (ratio * depth) for side in hw):
        raise UserError(
            f"resolution {hw[0]}x{hw[1]}: each side must be a multiple of {ratio * depth} "
            f"(VAE factor {ratio} x {depth} for {len(cfg.unet.levels)} levels)"
        )
    latent_hw = (hw[0] // ratio, hw[1] // ratio)
    model, variables, order = _traced_variables(cfg, DTYPES[dtype])
    params = _sizes_by_group(variables["params"])
    stats = _sizes_by_group(variables.get("batch_stats", {}))

    group_flops: dict[str, float] = {}
    on_target: dict[str, TargetCost] = {}
    cfg_step = train_step = target_step = None
    if flops or target:
        inputs = _abstract_inputs(cfg, latent_hw, 2 * images)
        group_flops, on_target = _group_costs(model, variables, inputs, target)

        def forward(v, *x):
            return model.apply(v, *x).sample

        cfg_step = xla_cost(forward, variables, *inputs, compile_it=compile_it)
        if target is not None:
            chip = aot.single_device(target)
            stored = jax.eval_shape(lambda v: cast_weights(v, model.dtype), variables)
            target_step, _ = aot.compile_report(forward, aot.abstract(stored, chip), *aot.abstract(inputs, chip),
                                                name=f"CFG step ({dtype})", target=target)
        if train:
            train_step = _train_step_cost(model, variables, _abstract_inputs(cfg, latent_hw, images))
    names = list(dict.fromkeys([*order, *params, *stats]))  # forward order
    rows = tuple(
        ModuleRow(n, params.get(n, 0), stats.get(n, 0), group_flops.get(n), on_target.get(n)) for n in names
    )
    return Inspection(cfg, latent_hw, images, rows, cfg_step, train_step, target_step)


def _describe_levels(cfg: ModelConfig) -> list[str]:
    """One line per level (and the mid block): width, native side and what its transformers hold."""
    unet = cfg.unet
    lines = []
    levels = [(f"level {i}", lv, unet.native_side(i)) for i, lv in enumerate(unet.levels)]
    if unet.mid_level is not None:
        levels.append(("mid", unet.mid_level, unet.native_side(len(unet.levels) - 1)))
    for name, lv, side in levels:
        if not lv.attention:
            mixers = "resnets only"
        else:
            mult = lv.ff_mult or (unet.mix_mlp_ratio if lv.feed_forward == "mix_ffn" else 4)
            mixers = (
                f"{lv.transformer_depth} x [self {lv.self_mixer}, cross {lv.cross_mixer}, "
                f"ff {lv.feed_forward} x{mult:g}]"
            )
        lines.append(f"  {name:8s} {lv.channels:5d} ch, native side {side:3d}: {mixers}")
    return lines


def _memory(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def format_report(ins: Inspection) -> str:
    """The printable table and totals."""
    cfg, unet = ins.config, ins.config.unet
    lines = [
        f"model_type {cfg.model_type} ({'teacher' if cfg.is_teacher else 'student'} family), "
        f"{len(unet.levels)} levels, {unet.layers_per_block} resnets per down block, conv {unet.conv_kind}",
        *_describe_levels(cfg),
        "config: valid",
        "",
    ]
    total_flops = ins.cfg_step.flops if ins.cfg_step else None
    whole_step = ins.target_step
    header = f"{'module':30s} {'params':>13s} {'BN stats':>9s}"
    if total_flops:
        header += f" {'GFLOPs':>10s} {'share':>6s}"
    if whole_step is not None:
        header += (f" | {'chip GFLOP':>10s} {'GB':>7s} {'roofline':>10s} {'bound':>7s}"
                   f" | {'HBM GB':>7s} {'roofline':>10s} {'bound':>7s}")
    lines += [header, "-" * len(header)]

    def on_target(cost: TargetCost | None) -> str:
        if cost is None:
            return ""
        def roofline(figure: tuple[float, str] | None) -> str:
            return f" {'—':>10s} {'':7s}" if figure is None else f" {figure[0] * 1e3:7.3f} ms {figure[1]:>7s}"

        hbm = f"{'—':>7s}" if cost.hbm_bytes is None else f"{cost.hbm_bytes / 1e9:7.3f}"
        return (f" | {cost.flops / 1e9:10.2f} {cost.bytes_accessed / 1e9:7.3f}{roofline(cost.roofline)}"
                f" | {hbm}{roofline(cost.hbm_roofline)}")

    def row(name: str, params: int, stats: int, flops: float | None, cost: TargetCost | None = None) -> str:
        text = f"{name:30s} {params:13,d} {stats:9,d}"
        if total_flops and flops is not None:
            text += f" {flops / 1e9:10.2f} {100 * flops / total_flops:5.1f}%"
        return text + on_target(cost)

    for r in ins.rows:
        lines.append(row(r.name, r.params, r.stats, r.flops, r.on_target))
    if total_flops:
        # Element-wise glue outside the rows: skip concatenations, the time sinusoid, the head's SiLU.
        rest = total_flops - sum(r.flops or 0.0 for r in ins.rows)
        lines.append(f"{'(between modules)':30s} {'':13s} {'':9s} {rest / 1e9:10.2f} {100 * rest / total_flops:5.1f}%")
    whole = None if whole_step is None else TargetCost.of(whole_step)
    lines += ["-" * len(header), row("total", ins.params, ins.stats, total_flops, whole), ""]
    lines.append(f"parameters: {ins.params:,d} ({4 * ins.params / 2**20:,.1f} MiB float32); "
                 f"BatchNorm statistics: {ins.stats:,d}")
    h, w = ins.latent_hw
    if ins.cfg_step:
        step = ins.cfg_step
        lines.append(
            f"one CFG step, {ins.images} image(s) at latent {h}x{w}: forward at batch {2 * ins.images}, "
            f"{step.flops / 1e9:,.1f} GFLOPs; activation memory (XLA temporaries, {jax.default_backend()}) "
            f"{_memory(step.temp_bytes)}, arguments {_memory(step.argument_bytes)}"
        )
    if whole_step is not None:
        lines += [f"on {whole_step.target}, each row's modules compiled alone for one chip (the total: the "
                  "whole step; a row's figures include reading its own inputs and weights, which the whole "
                  "step may fuse away):", whole_step.summary()]
    if ins.train_step:
        step = ins.train_step
        lines.append(
            f"one training step, batch {ins.images} at latent {h}x{w} (forward + backward, no remat): "
            f"{step.flops / 1e9:,.1f} GFLOPs; activation memory {_memory(step.temp_bytes)}"
        )
    return "\n".join(lines)


def parse_resolution(text: str) -> int | tuple[int, int]:
    """argparse type of --resolution: a side, or HxW, each a positive integer."""
    sides = [cli.positive_int(part) for part in text.lower().split("x")]
    if len(sides) > 2:
        raise argparse.ArgumentTypeError(f"expected a side or HxW, got {text!r}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m moebius_jax.inspect_model", description=__doc__)
    parser.add_argument("config", help="model YAML (reference schema, optionally with levels: overrides)")
    parser.add_argument("--resolution", type=parse_resolution, default=512, help="image side, or HxW (default 512)")
    parser.add_argument("--batch", type=cli.positive_int, default=1,
                        help="images per CFG step; the forward runs 2x this")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="parameters only (seconds)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip compiling the step: FLOPs only, no memory figures (faster)")
    parser.add_argument("--train", action="store_true", help="also cost one training step (compiles the backward)")
    parser.add_argument("--target", default=None,
                        help="also compile each module for one chip of a target (tpu:v5e:2x2 with the tpu extra, "
                             "gpu): its flops, bytes accessed, roofline and bound per row")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    args = parser.parse_args(argv)
    if args.target is not None:
        aot.target_devices(args.target)  # a bad target is refused before anything is traced
    try:
        ins = inspect_model(args.config, args.resolution, args.batch, args.flops, args.compile, args.train,
                            args.target, args.dtype)
    except UserError as e:  # the config or resolution fails the check: the verdict, not a failure
        print(f"invalid: {e}", file=sys.stderr)
        return 2
    print(format_report(ins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
