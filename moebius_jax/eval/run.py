"""Inpaint a benchmark folder and score it: predictions, metrics.json and a table in the paper's layout.

    python -m moebius_jax.eval.run [--weights W --vae V | --variant V] [--config C] --benchmark BENCH --out OUT \\
        [--fid-weights pt_inception-2015-12-05-6726825d.pth] [--lpips-backbone alexnet-owt-7be5be79.pth] \\
        [--steps 20] [--cfg 2.5] [--seed 0] [--batch-size 8] [--model-resolution R] [--limit N]

Writes OUT/pred/<stem>.png, OUT/run.json (the inference settings), OUT/metrics.json and
OUT/metrics.md, and prints the table (see `moebius_jax.eval.score` for the metrics). Without
--weights/--vae the released student (--variant) and VAE come from the Hugging Face Hub.

Resuming. Each prediction is written as soon as its batch is done, atomically (a temporary
file renamed when complete). A rerun keeps every prediction that is a valid RGB PNG of the
benchmark size and makes the rest; when none is missing the model is not even loaded.
Image k's noise depends only on --seed, --batch-size and k: the benchmark is cut into fixed
chunks of --batch-size, chunk c samples with seed + c * batch_size, and finished images keep
their places as no-op placeholders, so a resumed run makes the predictions an uninterrupted
one would (up to float rounding where a partly finished chunk runs as a smaller batch). A
rerun with other inference settings than OUT/run.json's is refused (its predictions would be
mixed with the old ones), and so is an OUT that holds anything but an earlier run.

The model runs at --model-resolution (default: the benchmark's) and its output is pasted back
at the benchmark size; at the benchmark's own resolution (a multiple of 64) that is exactly
the reference's output (`reference_size=True`). --limit N inpaints and scores only the first
N pairs, for a quick look.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from moebius_jax import cli, hub, runtime
from moebius_jax.errors import UserError
from moebius_jax.eval.benchmark import Pair, read_manifest
from moebius_jax.eval.score import (
    METRICS_JSON, METRICS_MD, add_metric_args, load_metric_nets, manifest_info, result_record, score_pairs,
    write_results)
from moebius_jax.io_safety import atomic_output, prepare_output_dir
from moebius_jax.pipeline.inpaint import DTYPES, InpaintPipeline, Timing
from moebius_jax.pipeline.preprocess import MIN_SIDE

log = logging.getLogger(__name__)

PRED = "pred"
RUN_SETTINGS = "run.json"
# Stands in for a finished image so the others keep their positions (the pipeline keys each
# image's noise by its position in the call); an empty mask returns it untouched, unrun.
_PLACEHOLDER_IMAGE = np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8)
_PLACEHOLDER_MASK = np.zeros((MIN_SIDE, MIN_SIDE), np.uint8)


class RunError(UserError):
    """The output folder cannot be resumed with these settings, or predictions failed."""


def run_settings(args: argparse.Namespace, resolution: int) -> dict[str, Any]:
    """Everything that decides the predictions (paths resolved, so a rerun from elsewhere matches)."""
    def resolved(path: str | None) -> str | None:
        return None if path is None else hub.canonical(path)

    return {
        "weights": resolved(args.weights), "vae": resolved(args.vae), "config": resolved(args.config),
        "dtype": args.dtype, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
        "batch_size": args.batch_size, "model_resolution": args.model_resolution or resolution,
    }


def check_settings(out: pathlib.Path, settings: dict[str, Any]) -> None:
    """Record the settings in OUT/run.json, or check that they are the recorded ones (an OUT
    holding anything else was refused before, by `prepare_output_dir`)."""
    path = out / RUN_SETTINGS
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunError(f"{path}: not valid JSON ({err}); delete it together with {out / PRED}") from None
        changed = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in settings.items() if recorded.get(k) != v]
        if changed:
            raise RunError(f"{out} holds predictions made with other settings ({'; '.join(changed)}); "
                           f"use another --out, or delete {out / PRED} and {path}")
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")


def is_finished(path: pathlib.Path, resolution: int) -> bool:
    """Whether ``path`` is a complete RGB PNG of the benchmark size (every chunk's CRC is
    checked, the pixels are not decoded)."""
    try:
        with Image.open(path) as image:
            header_ok = image.format == "PNG" and image.mode == "RGB" and image.size == (resolution, resolution)
            image.verify()
        return header_ok
    except (OSError, SyntaxError, ValueError):  # what Pillow raises for missing or broken files
        return False


def inpaint(pipe: InpaintPipeline, root: pathlib.Path, pairs: Sequence[Pair], pred_dir: pathlib.Path,
            settings: dict[str, Any], done: set[str]) -> list[str]:
    """Make the missing predictions chunk by chunk, writing each as it comes; returns the stems
    that failed (the pipeline logs why)."""
    pred_dir.mkdir(parents=True, exist_ok=True)
    size = settings["batch_size"]
    failed = []
    progress = tqdm(total=len(pairs), initial=len(done), desc="inpainting", unit="image")
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        todo = [pair.stem not in done for pair in chunk]
        if not any(todo):
            continue
        results = pipe(
            [p.image_path(root) if t else _PLACEHOLDER_IMAGE for p, t in zip(chunk, todo)],
            [p.mask_path(root) if t else _PLACEHOLDER_MASK for p, t in zip(chunk, todo)],
            steps=settings["steps"], guidance_scale=settings["cfg"], seed=settings["seed"] + start,
            resolution=settings["model_resolution"], batch_size=size, on_error="skip",
            strategy="resize",  # the benchmark protocol: the whole image at the model resolution
        )
        for pair, wanted, result in zip(chunk, todo, results):
            if not wanted:
                continue
            if result is None:
                failed.append(pair.stem)
                continue
            with atomic_output(pred_dir / f"{pair.stem}.png") as tmp:
                result.save(tmp, format="PNG")
        progress.update(sum(todo))
    progress.close()
    return failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=None,
                   help="student weights: .bin / .safetensors / EMA file, converted dir or Hugging Face id "
                        "(default: the released --variant)")
    p.add_argument("--variant", choices=hub.VARIANTS, default=None,
                   help="released student to fetch when --weights is not given (default: pretrained)")
    p.add_argument("--vae", default=None,
                   help=f"VAE: diffusers folder, LDM file, converted dir or Hugging Face id (default: {hub.DEFAULT_VAE})")
    p.add_argument("--config", default=None,
                   help="model YAML (default: saved with the weights, else configs/moebius.yaml)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--benchmark", required=True, help="folder made by moebius_jax.eval.make_benchmark")
    p.add_argument("--out", required=True, help="output folder (pred/, run.json, metrics.json, metrics.md): "
                                                "new, empty, or an earlier run's, which is resumed")
    p.add_argument("--name", default="Moebius (moebius-jax)", help="method name in the table")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N pairs")
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=cli.positive_int, default=20)
    s.add_argument("--cfg", type=cli.finite_float, default=2.5, help="guidance scale")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=cli.positive_int, default=8)
    s.add_argument("--model-resolution", type=cli.model_resolution, default=None,
                   help="short side the model runs at (default: the benchmark's)")
    add_metric_args(p)
    args = p.parse_args(argv)
    try:
        args.weights = hub.student_choice(args.weights, args.variant)
    except ValueError as e:
        p.error(str(e))
    args.vae = args.vae or hub.DEFAULT_VAE
    return args


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    runtime.enable_compilation_cache()
    root, out = pathlib.Path(args.benchmark), pathlib.Path(args.out)
    pred_dir = out / PRED
    prepare_output_dir(out, "--out", marker=RUN_SETTINGS, writes=[PRED, METRICS_JSON, METRICS_MD],
                       inputs=[root, args.weights, args.vae, *([args.config] if args.config else [])], overwrite=True)
    manifest = read_manifest(root)
    pairs = manifest.pairs[:args.limit]
    settings = run_settings(args, manifest.resolution)
    check_settings(out, settings)
    nets = load_metric_nets(args.fid_weights, args.lpips_backbone, args.lpips_net)  # fail before inpainting
    done = {p.stem for p in pairs if is_finished(pred_dir / f"{p.stem}.png", manifest.resolution)}
    log.info("%d of %d predictions present in %s; inpainting %d", len(done), len(pairs), pred_dir,
             len(pairs) - len(done))
    pipe = None
    if len(done) < len(pairs):
        with cli.user_inputs():
            pipe = InpaintPipeline.from_pretrained(args.weights, args.vae, config=args.config, dtype=args.dtype,
                                                   resolution=settings["model_resolution"])
        failed = inpaint(pipe, root, pairs, pred_dir, settings, done)
        if failed:
            raise RunError(f"{len(failed)} image(s) could not be inpainted ({', '.join(failed[:5])}); "
                           "not scoring an incomplete set")
    scores = score_pairs([(pred_dir / f"{p.stem}.png", p.image_path(root)) for p in pairs], nets,
                         args.metric_batch_size, args.workers)
    timing = pipe.timing if pipe is not None else Timing()
    inference = dict(settings, new_predictions=len(pairs) - len(done), reused_predictions=len(done),
                     compile_seconds=round(timing.compile_seconds, 2),
                     seconds_per_image=round(timing.run_seconds / timing.images, 4) if timing.images else None)
    record = result_record(args.name, manifest_info(manifest), scores, nets, inference)
    print(write_results(out, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
