"""Score inpainted images against their ground truth: FID, LPIPS, PSNR, SSIM (two variants).

    python -m moebius_jax.eval.score --pred DIR --gt BENCH_OR_DIR \\
        [--fid-weights pt_inception-2015-12-05-6726825d.pth] [--lpips-backbone alexnet-owt-7be5be79.pth] \\
        [--out DIR] [--name METHOD]

--gt is a benchmark folder (its manifest names the pairs and captions the table) or a plain
folder of images; predictions are matched by file stem and every ground-truth image needs
one (FID depends on the set size). All images must have one size. FID and LPIPS need their
networks' weight files (see `moebius_jax.eval.weights` for where to get them); a metric
whose weights are not given is skipped and the output says so. PSNR and SSIM need nothing.
Prints the table; with --out, writes OUT/metrics.json and OUT/metrics.md (OUT must be new or
empty, or hold an earlier metrics.json, which --overwrite replaces).

Everything streams in batches: FID keeps running statistics, the others running sums, so
memory does not grow with the benchmark. Network calls are padded to one batch shape (one
compile); PSNR/SSIM (float64 numpy) run in threads alongside them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from moebius_jax import cli
from moebius_jax.data.sources import folder_source
from moebius_jax.eval import image_metrics
from moebius_jax.eval.benchmark import MANIFEST, BenchmarkError, Manifest, read_manifest
from moebius_jax.eval.fid import InceptionStats, frechet_distance, inception_features, load_fid_inception
from moebius_jax.eval.lpips import LPIPS, NETS, load_lpips
from moebius_jax.eval.weights import BACKBONE_URLS, FID_INCEPTION_URL
from moebius_jax.io_safety import atomic_output, prepare_output_dir
from moebius_jax.pipeline.image_io import load_image

log = logging.getLogger(__name__)

# (key, column title, decimals): the paper reports FID and LPIPS; PSNR/SSIM are extra columns.
METRICS: tuple[tuple[str, str, int], ...] = (
    ("fid", "FID↓", 2),
    ("lpips", "LPIPS↓", 3),
    ("psnr", "PSNR↑", 2),
    ("ssim", "SSIM↑", 4),
    ("ssim_gaussian", "SSIM (Gaussian)↑", 4),
)
FID_CONVENTION = ("pytorch-fid 0.3.0: its Inception (pt_inception-2015-12-05), bilinear resize to 299 without "
                  "antialiasing, float64 mean and unbiased covariance (ddof=1), predictions vs ground truth")
PIXEL_CONVENTION = ("PSNR and SSIM as scikit-image computes them on uint8 RGB, mean over images; SSIM: 7x7 "
                    "uniform window (skimage defaults), SSIM (Gaussian): 11x11 sigma 1.5 (Wang et al., MAT's script)")

Pairs = Sequence[tuple[pathlib.Path, pathlib.Path]]  # (prediction, ground truth)
METRICS_JSON, METRICS_MD = "metrics.json", "metrics.md"  # what write_results writes


@dataclasses.dataclass(frozen=True, eq=False)
class MetricNets:
    """The loaded metric networks; a missing one is None with the reason in ``skipped``."""

    inception: tuple[Any, Any] | None
    lpips: LPIPS | None
    lpips_net: str
    skipped: dict[str, str]


def load_metric_nets(fid_weights: str | os.PathLike | None, lpips_backbone: str | os.PathLike | None,
                     lpips_net: str = "alex") -> MetricNets:
    """Load the networks whose weight files are given (a bad file raises, naming it)."""
    skipped = {}
    inception = lpips = None
    if fid_weights is None:
        skipped["fid"] = f"no --fid-weights given (pytorch-fid's Inception: {FID_INCEPTION_URL})"
    else:
        inception = load_fid_inception(fid_weights)
    if lpips_backbone is None:
        skipped["lpips"] = f"no --lpips-backbone given (torchvision's {lpips_net} weights: {BACKBONE_URLS[lpips_net]})"
    else:
        lpips = load_lpips(lpips_net, lpips_backbone)
    return MetricNets(inception, lpips, lpips_net, skipped)


@dataclasses.dataclass(frozen=True)
class Scores:
    """Benchmark-level values (None when skipped, with the reason in ``skipped``)."""

    count: int
    metrics: dict[str, float | None]
    skipped: dict[str, str]


def read_rgb(path: pathlib.Path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file, read like the pipeline reads inputs."""
    return np.asarray(load_image(path))


_PIXEL_METRICS = ("psnr", "ssim", "ssim_gaussian")


def _pixel_metrics(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """The _PIXEL_METRICS of one pair (float64 numpy, run in a host thread)."""
    return (image_metrics.psnr(pred, gt), image_metrics.ssim(pred, gt, "skimage"),
            image_metrics.ssim(pred, gt, "gaussian"))


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` filled up to ``size`` rows with copies of its last one, so every network
    call has the same shape and compiles once."""
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


def _load_batch(pool: concurrent.futures.Executor, chunk: Pairs,
                shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """Read a chunk's predictions and ground truths; every image must have ``shape`` (or the
    first ground truth's, when None)."""
    pred = list(pool.map(read_rgb, [p for p, _ in chunk]))
    gt = list(pool.map(read_rgb, [g for _, g in chunk]))
    shape = shape or gt[0].shape
    for (p, g), a, b in zip(chunk, pred, gt):
        for path, image in ((g, b), (p, a)):
            if image.shape != shape:
                raise BenchmarkError(f"{path} is {image.shape[1]}x{image.shape[0]}, not {shape[1]}x{shape[0]} like "
                                     "the other images: predictions and ground truths must all have one size")
    return np.stack(pred), np.stack(gt)


def score_pairs(pairs: Pairs, nets: MetricNets, batch_size: int = 16, workers: int | None = None) -> Scores:
    """FID, LPIPS, PSNR and SSIM of (prediction, ground truth) file pairs, streamed in batches."""
    if not pairs:
        raise ValueError("no image pairs to score")
    size = min(batch_size, len(pairs))
    sums = dict.fromkeys(("lpips", *_PIXEL_METRICS), 0.0)
    stats_pred = stats_gt = InceptionStats.empty()
    shape = None
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for start in tqdm(range(0, len(pairs), size), desc="scoring", unit="batch"):
            chunk = pairs[start:start + size]
            pred, gt = _load_batch(pool, chunk, shape)
            shape = gt.shape[1:]
            n = len(chunk)
            # Host metrics in threads while the networks run on the accelerator.
            pixel = [pool.submit(_pixel_metrics, a, b) for a, b in zip(pred, gt)]
            if nets.lpips is not None:
                x, y = (_padded(v, size).astype(np.float32) / 255 for v in (pred, gt))
                sums["lpips"] += float(np.sum(np.asarray(nets.lpips(x, y, normalize=True), np.float64)[:n]))
            if nets.inception is not None:
                module, variables = nets.inception
                feats = np.asarray(inception_features(module, variables, np.concatenate(
                    [_padded(pred, size), _padded(gt, size)])))
                stats_pred, stats_gt = stats_pred.update(feats[:n]), stats_gt.update(feats[size:size + n])
            for future in pixel:
                for key, value in zip(_PIXEL_METRICS, future.result()):
                    sums[key] += value
    count = len(pairs)
    skipped = dict(nets.skipped)
    metrics: dict[str, float | None] = {key: total / count for key, total in sums.items()}
    if nets.lpips is None:
        metrics["lpips"] = None
    metrics["fid"] = None
    if nets.inception is not None and count < 2:
        skipped["fid"] = "FID needs at least 2 images (a covariance)"
    elif nets.inception is not None:
        log.info("FID: Frechet distance of the two 2048-d statistics (float64, on the host)")
        metrics["fid"] = frechet_distance(stats_pred.mean, stats_pred.cov(), stats_gt.mean, stats_gt.cov())
    return Scores(count, {key: metrics[key] for key, _, _ in METRICS}, skipped)


def manifest_info(manifest: Manifest) -> dict[str, Any]:
    """Caption facts of a benchmark folder."""
    return {"name": manifest.name, "resolution": f"{manifest.resolution}x{manifest.resolution}",
            "size": len(manifest.pairs), "masks": manifest.mask_summary(), "source": manifest.source}


def folder_info(gt_dir: pathlib.Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """Caption facts of a plain ground-truth folder: its name and image size."""
    return {"name": gt_dir.resolve().name, "resolution": f"{shape[1]}x{shape[0]}", "size": None,
            "masks": "not recorded", "source": str(gt_dir)}


def result_record(method: str, benchmark: dict[str, Any], scores: Scores, nets: MetricNets,
                  inference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json content: what was measured, on what, how, and what was skipped."""
    record = {
        "method": method,
        "benchmark": benchmark,
        "count": scores.count,
        "metrics": scores.metrics,
        "skipped": scores.skipped,
        "conventions": {
            "fid": FID_CONVENTION,
            "lpips": f"lpips 0.1.4 v0.1 ({nets.lpips_net}), images in [0, 1] with normalize=True, mean over images",
            "psnr_ssim": PIXEL_CONVENTION,
        },
    }
    if inference is not None:
        record["inference"] = inference
    return record


def markdown_table(record: dict[str, Any]) -> str:
    """The paper's layout: a caption, one row per method, FID↓ / LPIPS↓ (+ PSNR / SSIM)."""
    b = record["benchmark"]
    count = record["count"]
    subset = f" (the first {count} of {b['size']})" if b["size"] not in (None, count) else ""
    lines = [
        f"**{b['name']}**: {b['resolution']}, {count} images{subset}, masks: {b['masks']}. "
        f"FID: {FID_CONVENTION}.",
        "",
        "| Method | " + " | ".join(title for _, title, _ in METRICS) + " |",
        "|:--|" + "--:|" * len(METRICS),
        f"| {record['method']} | " + " | ".join(
            "–" if record["metrics"][key] is None else f"{record['metrics'][key]:.{digits}f}"
            for key, _, digits in METRICS) + " |",
    ]
    if record["skipped"]:
        lines.append("")
        lines += [f"- {key.upper()} not computed: {why}" for key, why in record["skipped"].items()]
    return "\n".join(lines) + "\n"


def write_results(out: pathlib.Path, record: dict[str, Any]) -> str:
    """Write OUT/metrics.json and OUT/metrics.md atomically; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(record)
    with atomic_output(out / METRICS_JSON) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    with atomic_output(out / METRICS_MD) as tmp:
        tmp.write_text(table)
    return table


def ground_truth(gt: pathlib.Path) -> tuple[Manifest | None, dict[str, pathlib.Path]]:
    """The ground-truth files by stem: a benchmark's images, or a plain image folder."""
    if (gt / MANIFEST).exists():
        manifest = read_manifest(gt)
        return manifest, {p.stem: p.image_path(gt) for p in manifest.pairs}
    return None, {pathlib.Path(i.image).stem: pathlib.Path(i.image) for i in folder_source(gt).items}


def match_predictions(pred_dir: pathlib.Path,
                      gt_files: dict[str, pathlib.Path]) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(prediction, ground truth) per ground-truth stem, in order; every one must exist."""
    preds = {pathlib.Path(i.image).stem: pathlib.Path(i.image) for i in folder_source(pred_dir).items}
    missing = [stem for stem in gt_files if stem not in preds]
    if missing:
        raise BenchmarkError(f"{pred_dir}: no prediction for {len(missing)} of {len(gt_files)} ground-truth images "
                             f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    extra = len(preds.keys() - gt_files.keys())
    if extra:
        log.warning("%s: %d file(s) without ground truth are ignored", pred_dir, extra)
    return [(preds[stem], path) for stem, path in gt_files.items()]


def add_metric_args(p: argparse.ArgumentParser) -> None:
    """The metric options eval.score and eval.run share."""
    m = p.add_argument_group("metrics")
    m.add_argument("--fid-weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    m.add_argument("--lpips-backbone", default=None, help="torchvision ImageNet weights of --lpips-net")
    m.add_argument("--lpips-net", choices=NETS, default="alex")
    m.add_argument("--metric-batch-size", type=cli.positive_int, default=16,
                   help="images per network call; float32 LPIPS/FID move in the last digits with it, "
                        "so keep it fixed between runs you compare")
    m.add_argument("--workers", type=cli.positive_int, default=None,
                   help="host threads for reading images and PSNR/SSIM")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--pred", required=True, help="folder of inpainted images, named by ground-truth stem")
    p.add_argument("--gt", required=True, help="benchmark folder, or a folder of ground-truth images")
    p.add_argument("--out", default=None, help="write metrics.json and metrics.md here")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier metrics.json in --out")
    p.add_argument("--name", default=None, help="method name for the table (default: the --pred folder name)")
    add_metric_args(p)
    return p.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    pred_dir, gt_dir = pathlib.Path(args.pred), pathlib.Path(args.gt)
    if args.out:  # checked now: the results are written only after the whole scoring
        prepare_output_dir(args.out, "--out", marker=METRICS_JSON, writes=[METRICS_MD], inputs=[pred_dir, gt_dir],
                           overwrite=args.overwrite)
    manifest, gt_files = ground_truth(gt_dir)
    pairs = match_predictions(pred_dir, gt_files)
    nets = load_metric_nets(args.fid_weights, args.lpips_backbone, args.lpips_net)
    scores = score_pairs(pairs, nets, args.metric_batch_size, args.workers)
    info = folder_info(gt_dir, read_rgb(pairs[0][1]).shape) if manifest is None else manifest_info(manifest)
    record = result_record(args.name or pred_dir.resolve().name, info, scores, nets)
    table = write_results(pathlib.Path(args.out), record) if args.out else markdown_table(record)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
