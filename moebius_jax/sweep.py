"""Sweep runner: train several architecture variants on identical batches and compare them.

    python -m moebius_jax.sweep configs/sweeps/mixers_tiny.yaml [--out DIR] [--steps N]

A sweep file names a base training config and, per variant, `key=value` overrides of it,
exactly as `train.py` takes them; `model.*` keys change the model (see
`moebius_jax.train.config`), integer components index lists:

    train: configs/train_demo.yaml      # base training config (paths relative to the working dir)
    overrides: [data.image_size=64]     # overrides shared by every variant
    steps: 40
    out: runs/sweeps/mixers_tiny
    variants:
      reference: {}                     # the base model, unchanged
      attention:
        overrides: [model.levels.0.self_mixer=attention]
      lower_lr:
        overrides: [optimizer.learning_rate=3e-4]

Every variant trains with the same seed, so the same data order, masks, timesteps and noise
(the data pipeline and the step's random stream depend on the seed and the step only); a
variant may change the model and the optimiser, never the data or the seed. Each variant is
an ordinary `train.py` run in OUT/<name>/ (checkpoints, metrics.jsonl, TensorBoard, and the
config.yaml, model included, that reproduces it). OUT/sweep.jsonl holds every logged step of
every variant followed by one summary record per variant (parameters, compile seconds,
median step milliseconds, final loss), and OUT/sweep.png plots the loss
curves, final loss against parameters and final loss against step latency (needs matplotlib,
the `plot` extra). Re-running the same command resumes: finished variants are skipped and an
interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moebius_jax import cli
from moebius_jax.errors import ConfigError, read_yaml
from moebius_jax.train.config import TrainConfig, load_train_config

log = logging.getLogger("moebius_jax.sweep")

# Train-config keys a variant may not override: they would break "identical batches".
_SHARED_KEYS = ("data.", "seed", "timestep_sampling", "noise_offset", "max_steps", "mesh.")
# The final loss of a variant: the mean over this many last logged steps (one step is noisy).
_FINAL_WINDOW = 5


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]  # train-config overrides of this variant only (after the shared ones)


@dataclasses.dataclass(frozen=True)
class Sweep:
    train: pathlib.Path
    overrides: tuple[str, ...]
    steps: int
    out: pathlib.Path
    variants: tuple[Variant, ...]


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of key=value strings, got {value!r}")
    return tuple(value)


def load_sweep(path: str | pathlib.Path, out: str | pathlib.Path | None = None, steps: int | None = None) -> Sweep:
    """Read and validate a sweep file; errors name the file and the offending key."""
    path = pathlib.Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a YAML mapping")
    unknown = set(raw) - {"train", "overrides", "steps", "out", "variants"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} (train, overrides, steps, out, variants)")
    for key in ("train", "variants"):
        if key not in raw:
            raise ValueError(f"{path}: missing `{key}`")
    variants_raw = raw["variants"]
    if not isinstance(variants_raw, Mapping) or not variants_raw:
        raise ValueError(f"{path}: `variants` must be a non-empty mapping of name -> changes")
    variants = []
    for name, spec in variants_raw.items():
        where = f"{path}: variants.{name}"
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}: a variant name must be letters, digits, '_' or '-' (it names a folder)")
        spec = spec or {}
        if not isinstance(spec, Mapping) or set(spec) - {"overrides"}:
            raise ValueError(f"{where}: expected a mapping with `overrides` (a list of key=value, "
                             f"e.g. model.levels.0.self_mixer=attention), got {spec!r}")
        overrides = _str_list(spec.get("overrides"), f"{where}.overrides")
        for item in overrides:
            if item.split("=", 1)[0].startswith(_SHARED_KEYS):
                raise ValueError(f"{where}.overrides: {item!r} would change what every variant shares "
                                 f"(data, seed, steps, mesh); set it for the whole sweep")
        variants.append(Variant(name, overrides))
    steps = raw.get("steps") if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{path}: `steps` must be a positive integer, got {steps!r}")
    out = out if out is not None else raw.get("out", pathlib.Path("runs") / "sweeps" / path.stem)
    return Sweep(pathlib.Path(raw["train"]), _str_list(raw.get("overrides"), f"{path}: overrides"), steps,
                 pathlib.Path(out), tuple(variants))


def variant_configs(sweep: Sweep) -> dict[str, TrainConfig]:
    """name -> train config (model included) for every variant, all validated before any trains."""
    configs = {}
    for variant in sweep.variants:
        try:
            configs[variant.name] = load_train_config(
                sweep.train, [*sweep.overrides, *variant.overrides, f"max_steps={sweep.steps}"])
        except ValueError as e:
            raise ConfigError(f"sweep variant {variant.name!r}: {e}") from e
    return configs


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(name: str, records: list[dict[str, Any]], params: int, compile_s: float) -> dict[str, Any]:
    # The first logged interval also pays for the data workers' start-up.
    rates = [r["steps_per_second"] for r in records[1:]] or [r["steps_per_second"] for r in records]
    losses = [r["loss"] for r in records[-_FINAL_WINDOW:]]
    return {"variant": name, "summary": True, "params": params, "compile_s": round(compile_s, 3),
            "step_ms": 1000.0 / float(np.median(rates)), "final_loss": float(np.mean(losses)),
            "steps": records[-1]["step"]}


def run_variant(name: str, config: TrainConfig, steps: int, workdir: pathlib.Path) -> dict[str, Any]:
    """Train one variant to `steps` (resuming if it was interrupted); returns its summary."""
    import jax

    from moebius_jax.train.loop import Trainer  # JAX and the trainer only when something trains

    summary_path = workdir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary["steps"] >= steps:
            log.info("sweep: %s already trained to step %d, skipped", name, summary["steps"])
            return summary
    trainer = Trainer.build(config, workdir)
    params = int(sum(x.size for x in jax.tree.leaves(trainer.state.params)))
    trainer.run(resume=True, max_steps=steps)
    summary = _summary(name, _read_jsonl(workdir / "metrics.jsonl"), params, trainer.compile_seconds)
    summary_path.write_text(json.dumps(summary) + "\n")
    return summary


def collect(sweep: Sweep) -> list[dict[str, Any]]:
    """Every variant's logged steps (tagged with its name), then the summaries of those finished."""
    steps, summaries = [], []
    for variant in sweep.variants:
        workdir = sweep.out / variant.name
        steps += [{"variant": variant.name, **r} for r in _read_jsonl(workdir / "metrics.jsonl")]
        if (workdir / "summary.json").exists():
            summaries.append(json.loads((workdir / "summary.json").read_text()))
    return steps + summaries


def plot(records: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Loss curves, final loss vs parameters, final loss vs step latency, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("the sweep plot needs matplotlib: pip install -e '.[plot]'") from e
    summaries = [r for r in records if r.get("summary")]
    names = list(dict.fromkeys(r["variant"] for r in records))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, (curves, by_params, by_latency) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in names:
        points = [(r["step"], r["loss"]) for r in records if r["variant"] == name and not r.get("summary")]
        if points:
            curves.plot(*zip(*points), label=name, color=colours[name], linewidth=1.2)
    curves.set(xlabel="step", ylabel="training loss", title="loss curves (identical batches)")
    curves.legend(fontsize=8)
    for axis, key, label in ((by_params, "params", "parameters (millions)"),
                             (by_latency, "step_ms", "train step (ms)")):
        for s in summaries:
            x = s[key] / 1e6 if key == "params" else s[key]
            axis.scatter(x, s["final_loss"], color=colours[s["variant"]], s=40)
            axis.annotate(s["variant"], (x, s["final_loss"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        axis.set(xlabel=label, ylabel=f"final loss (mean of last {_FINAL_WINDOW} logs)")
    by_params.set_title("final loss vs parameters")
    by_latency.set_title("final loss vs step latency")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(sweep: Sweep, make_plot: bool = True) -> list[dict[str, Any]]:
    """Train every variant (skipping finished ones), write sweep.jsonl and sweep.png; returns the records."""
    configs = variant_configs(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    for i, variant in enumerate(sweep.variants, 1):
        log.info("sweep: [%d/%d] %s", i, len(sweep.variants), variant.name)
        run_variant(variant.name, configs[variant.name], sweep.steps, sweep.out / variant.name)
        records = collect(sweep)
        # Rewritten after each variant, so an interrupted sweep still has what it measured.
        (sweep.out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if make_plot:
        plot(records, sweep.out / "sweep.png")
    return records


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m moebius_jax.sweep", description=__doc__)
    parser.add_argument("sweep", type=pathlib.Path, help="sweep YAML (e.g. configs/sweeps/mixers_tiny.yaml)")
    parser.add_argument("--out", type=pathlib.Path, help="output folder (default: the file's `out`)")
    parser.add_argument("--steps", type=cli.positive_int, help="train steps per variant (default: the file's `steps`)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sweep = load_sweep(args.sweep, args.out, args.steps)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    records = run_sweep(sweep, make_plot=not args.no_plot)
    for s in (r for r in records if r.get("summary")):
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
