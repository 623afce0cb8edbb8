"""Accounting for a model config: parameters per module, FLOPs and activation memory of one
classifier-free-guidance step, and a validity check.

    python -m moebius_jax.inspect_model CONFIG [--resolution 512 | HxW] [--batch B] [--no-flops] [--no-compile] [--train]

Nothing is allocated: parameter shapes come from `jax.eval_shape`; FLOPs from XLA's cost
analysis of the lowered program on abstract inputs (with loop bodies, e.g. GLA's chunk scan,
counted once per iteration, which XLA's analysis does not do); activation memory from the
compiled program's buffer assignment (`memory_analysis`, for the backend JAX runs on: the
CPU figure is an estimate of what an accelerator needs). One CFG step is one forward at batch
2B (conditional and unconditional halves), as the sampler runs it. Per-module FLOPs come from
lowering each report row's modules alone on the shapes they see in the full forward.
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
import jax.extend as jex
import jax.numpy as jnp
from flax import traverse_util

from moebius_jax import cli
from moebius_jax.config import ModelConfig, load_config
from moebius_jax.errors import UserError
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
class ModuleRow:
    """One report row: trained parameters, BatchNorm statistics, forward FLOPs (None: not measured)."""

    name: str
    params: int
    stats: int
    flops: float | None = None


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


def _traced_variables(config: ModelConfig) -> tuple[RemovalModel, dict[str, Any], list[str]]:
    """The model, the shapes of all its variables (no allocation) and the report rows in call order."""
    model = RemovalModel(config.unet)
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


def _body_flops(body: Any) -> float:
    """XLA's FLOP estimate of a closed jaxpr run once on abstract arguments."""
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in body.jaxpr.invars]
    return float(jax.jit(jex.core.jaxpr_as_fun(body)).lower(*args).cost_analysis()["flops"])


def _loop_correction(jaxpr: Any) -> float:
    """FLOPs XLA's analysis leaves out: it costs a loop body once whatever the trip count, so
    each scan (GLA's chunk loop, for one) adds (length - 1) more bodies, nested scans included."""
    extra = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body, length = eqn.params["jaxpr"], eqn.params["length"]
            extra += (length - 1) * _body_flops(body) + length * _loop_correction(body.jaxpr)
        else:
            extra += sum(_loop_correction(sub) for sub in jex.core.jaxprs_in_params(eqn.params))
    return extra


def xla_cost(fn: Any, *args: Any, compile_it: bool = True) -> StepCost:
    """FLOPs of `fn(*args)` (abstract args) from XLA's cost analysis of the lowered program, loops
    counted per iteration; with `compile_it`, the compiled program's buffer sizes too."""
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower()
    flops = float(lowered.cost_analysis()["flops"]) + _loop_correction(traced.jaxpr.jaxpr)
    if not compile_it:
        return StepCost(flops, None, None)
    memory = lowered.compile().memory_analysis()
    return StepCost(flops, getattr(memory, "temp_size_in_bytes", None), getattr(memory, "argument_size_in_bytes", None))


def _subtree(variables: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for collection, tree in variables.items():
        for part in path:
            tree = tree.get(part) if isinstance(tree, Mapping) else None
        if tree is not None:
            out[collection] = tree
    return out


def _group_flops(model: RemovalModel, variables: Mapping[str, Any], inputs: tuple) -> dict[str, float]:
    """Forward FLOPs of each report row: trace the full forward once, recording the arguments
    every row's root module is called with, then lower each root alone on those shapes."""
    calls: dict[tuple[str, ...], tuple[nn.Module, tuple, dict]] = {}

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.scope.path) if context.module.scope else ()
        if context.method_name == "__call__" and _is_row_root(path):
            calls.setdefault(path, (context.module.clone(parent=None), args, kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, *x: model.apply(v, *x).sample, variables, *inputs)

    flops: dict[str, float] = {}
    for path, (module, args, kwargs) in calls.items():
        # Arrays become abstract arguments; the rest (map sizes, train flags) stays static.
        leaves, treedef = jax.tree.flatten((args, kwargs))
        arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
        dynamic = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in arrays]
        cost = xla_cost(_replay(module, leaves, treedef, arrays), _subtree(variables, path), dynamic, compile_it=False)
        name = module_group(path)[0]
        flops[name] = flops.get(name, 0.0) + cost.flops
    return flops


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
) -> Inspection:
    """Account for `config` at `resolution` (image pixels, side or (H, W)) for `images` per CFG step.

    Raises ValueError (from the config check, or for a resolution the network cannot run at).
    `compile_it=False` skips compiling: FLOPs only, no memory figures.
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
    model, variables, order = _traced_variables(cfg)
    params = _sizes_by_group(variables["params"])
    stats = _sizes_by_group(variables.get("batch_stats", {}))

    group_flops: dict[str, float] = {}
    cfg_step = train_step = None
    if flops:
        inputs = _abstract_inputs(cfg, latent_hw, 2 * images)
        group_flops = _group_flops(model, variables, inputs)
        cfg_step = xla_cost(lambda v, *x: model.apply(v, *x).sample, variables, *inputs, compile_it=compile_it)
        if train:
            train_step = _train_step_cost(model, variables, _abstract_inputs(cfg, latent_hw, images))
    names = list(dict.fromkeys([*order, *params, *stats]))  # forward order
    rows = tuple(
        ModuleRow(n, params.get(n, 0), stats.get(n, 0), group_flops.get(n)) for n in names
    )
    return Inspection(cfg, latent_hw, images, rows, cfg_step, train_step)


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
    header = f"{'module':30s} {'params':>13s} {'BN stats':>9s}"
    if total_flops:
        header += f" {'GFLOPs':>10s} {'share':>6s}"
    lines += [header, "-" * len(header)]

    def row(name: str, params: int, stats: int, flops: float | None) -> str:
        text = f"{name:30s} {params:13,d} {stats:9,d}"
        if total_flops and flops is not None:
            text += f" {flops / 1e9:10.2f} {100 * flops / total_flops:5.1f}%"
        return text

    for r in ins.rows:
        lines.append(row(r.name, r.params, r.stats, r.flops))
    if total_flops:
        # Element-wise glue outside the rows: skip concatenations, the time sinusoid, the head's SiLU.
        rest = total_flops - sum(r.flops or 0.0 for r in ins.rows)
        lines.append(f"{'(between modules)':30s} {'':13s} {'':9s} {rest / 1e9:10.2f} {100 * rest / total_flops:5.1f}%")
    lines += ["-" * len(header), row("total", ins.params, ins.stats, total_flops), ""]
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
    args = parser.parse_args(argv)
    try:
        ins = inspect_model(args.config, args.resolution, args.batch, args.flops, args.compile, args.train)
    except UserError as e:  # the config or resolution fails the check: the verdict, not a failure
        print(f"invalid: {e}", file=sys.stderr)
        return 2
    print(format_report(ins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
