"""Inpaint images with Moebius.

One pair:     python infer.py --image photo.jpg --mask mask.png --out result.png
A folder:     python infer.py --image-dir photos/ --mask-dir masks/ --out-dir results/
Local files:  python infer.py --weights W.bin --vae VAE_FOLDER --image ... --mask ... --out ...

Masks are white (>= 128) where the image should be filled. Folder pairs are matched by file
stem; files without a partner are listed, not silently skipped, and a folder holding two files
with one stem (a.jpg and a.png) is refused, naming them. Results keep the input's size
and, outside the blurred mask border, its exact pixels (`--reference-size` gives the
reference's resized output instead). `--strategy crop` (default) fills the mask in square
windows around it at the model's own scale, `--strategy resize` runs the whole photo with its
short side resized to the model's resolution; both agree when the short side is at most that.
Without `--weights`/`--vae` the released student (`--variant`) and VAE are fetched from the
Hugging Face Hub once and converted once into ~/.cache/moebius_jax; `--weights` may also be a
.bin / .safetensors / EMA file, a directory from `python -m moebius_jax.convert`, or another
Hub id `org/repo/path`. Compiled programs are kept in JAX's persistent cache, so a second run
skips compilation.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from moebius_jax import cli
from moebius_jax.errors import UserError
from moebius_jax.io_safety import atomic_output, check_creatable, check_output_file, image_format
from moebius_jax.hub import DEFAULT_VAE, VARIANTS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=None,
                   help="student weights: file, converted dir or Hugging Face id (default: the released --variant)")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="released student to fetch when --weights is not given (default: pretrained)")
    p.add_argument("--vae", default=None,
                   help=f"VAE: diffusers folder, LDM file, converted dir or Hugging Face id (default: {DEFAULT_VAE})")
    p.add_argument("--config", default=None, help="model YAML (default: saved with the weights, else configs/moebius.yaml)")
    one = p.add_argument_group("one image")
    one.add_argument("--image")
    one.add_argument("--mask")
    one.add_argument("--out")
    many = p.add_argument_group("a folder")
    many.add_argument("--image-dir")
    many.add_argument("--mask-dir")
    many.add_argument("--out-dir")
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=cli.positive_int, default=20)
    s.add_argument("--cfg", type=cli.finite_float, default=2.5, help="guidance scale")
    s.add_argument("--seed", type=int, default=0, help="noise seed; -1 draws one at random and prints it")
    s.add_argument("--mask-dilate", type=cli.non_negative_int, default=0, metavar="K",
                   help="grow the mask by a KxK square first, as the reference's mask_dilate_kernel_size (0: off)")
    s.add_argument("--cfg-until", type=cli.non_negative_int, default=None, metavar="STEP",
                   help="guidance on the first STEP steps only, conditional prediction after (default: every step)")
    s.add_argument("--resolution", type=cli.model_resolution, default=None,
                   help="short side the model runs at (default: config image size)")
    s.add_argument("--noise-offset", type=cli.finite_float, default=0.0357)
    s.add_argument("--strength", type=cli.fraction, default=0.99, help="in (0, 1]")
    s.add_argument("--no-paste", action="store_true", help="return the raw decoded image, no blending with the input")
    s.add_argument("--compensate", action="store_true", help="colour-compensated paste")
    s.add_argument("--reference-size", action="store_true", help="output at the resized multiple-of-64 size, as the reference")
    s.add_argument("--resize-mask", action="store_true", help="resize a mask whose size differs from its image")
    s.add_argument("--strategy", choices=("crop", "resize"), default="crop",
                   help="crop: windows around the mask at the model's scale; resize: the whole image")
    s.add_argument("--crop-margin", type=cli.non_negative_float, default=0.5,
                   help="crop context on each side of the mask, as a fraction of its bounding box's long side")
    s.add_argument("--batch-size", type=cli.positive_int, default=8)
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    c = p.add_argument_group("compilation cache")
    c.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache (default: $MOEBIUS_JAX_COMPILE_CACHE, else ~/.cache/moebius_jax/jax)")
    c.add_argument("--no-compile-cache", action="store_const", const="off", dest="compile_cache",
                   help="compile every run from scratch")
    args = p.parse_args(argv)
    single = [args.image, args.mask, args.out]
    folder = [args.image_dir, args.mask_dir, args.out_dir]
    if any(single) == any(folder):
        p.error("give either --image/--mask/--out or --image-dir/--mask-dir/--out-dir")
    if any(single) and not all(single):
        p.error("--image, --mask and --out go together")
    if any(folder) and not all(folder):
        p.error("--image-dir, --mask-dir and --out-dir go together")
    if args.mask_dilate < 0:
        p.error(f"--mask-dilate must be >= 0, got {args.mask_dilate}")
    if args.cfg_until is not None and args.cfg_until < 0:
        p.error(f"--cfg-until must be >= 0, got {args.cfg_until}")
    if args.seed < -1:
        p.error(f"--seed must be >= 0, or -1 for a random seed; got {args.seed}")
    return args


def _listing(folder: pathlib.Path, flag: str) -> dict[str, pathlib.Path]:
    """The image files of ``folder`` by stem; two files with one stem are refused (which one pairs
    with the mask would be a guess, and both would write the same output)."""
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: {'a file, not a folder' if folder.exists() else 'no such folder'}")
    by_stem: dict[str, list[pathlib.Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(f.stem, []).append(f)
    shared = [", ".join(f.name for f in files) for files in by_stem.values() if len(files) > 1]
    if shared:
        raise UserError(f"{flag} {folder}: files are paired by stem, and these share one: {'; '.join(shared)}; "
                        "rename or move all but one of each")
    return {stem: files[0] for stem, files in by_stem.items()}


def pair_folders(image_dir: pathlib.Path, mask_dir: pathlib.Path) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[pathlib.Path]]:
    """(image, mask) pairs matched by stem, and the files that have no partner."""
    images, masks = _listing(image_dir, "--image-dir"), _listing(mask_dir, "--mask-dir")
    pairs = [(images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    unmatched = [images[s] for s in sorted(images.keys() - masks.keys())] + \
                [masks[s] for s in sorted(masks.keys() - images.keys())]
    return pairs, unmatched


Job = tuple[pathlib.Path, pathlib.Path, pathlib.Path]  # image, mask, output


def plan_jobs(args: argparse.Namespace, log: logging.Logger) -> tuple[list[Job], str]:
    """(image, mask, output) triples and the output format, every path checked before a model loads:
    inputs exist, outputs are writable files with a suffix Pillow writes, none is an input."""
    if args.image:
        jobs = [(pathlib.Path(args.image), pathlib.Path(args.mask), pathlib.Path(args.out))]
        for flag, path in (("--image", jobs[0][0]), ("--mask", jobs[0][1])):
            if not path.is_file():
                raise UserError(f"{flag} {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
        fmt = image_format(jobs[0][2], "--out")
    else:
        pairs, unmatched = pair_folders(pathlib.Path(args.image_dir), pathlib.Path(args.mask_dir))
        for f in unmatched:
            log.warning("no partner for %s (pairs are matched by file stem); not processed", f)
        out_dir = pathlib.Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out-dir {out_dir}: a file, not a folder")
        check_creatable(out_dir, "--out-dir")
        jobs = [(image, mask, out_dir / f"{image.stem}.png") for image, mask in pairs]
        fmt = "PNG"
        if not jobs:
            raise UserError(f"no image/mask pairs in {args.image_dir} and {args.mask_dir} (pairs share a file stem)")
    inputs = {path.resolve() for job in jobs for path in job[:2]}
    for *_, out in jobs:
        check_output_file(out, "--out" if args.image else "output", inputs)
    if args.config is not None:
        from moebius_jax.config import load_config

        load_config(args.config)  # a bad config fails now, not after the weights are fetched
    return jobs, fmt


def load_pipeline(args: argparse.Namespace):
    from moebius_jax.pipeline.inpaint import InpaintPipeline

    return InpaintPipeline.from_pretrained(args.weights, args.vae, config=args.config, dtype=args.dtype,
                                           resolution=args.resolution, variant=args.variant,
                                           compile_cache=args.compile_cache)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for noisy in ("absl", "orbax"):  # per-restore chatter when the converted weights load
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("infer")
    from tqdm import tqdm

    jobs, fmt = plan_jobs(args, log)
    with cli.user_inputs():
        pipe = load_pipeline(args)
    from moebius_jax.pipeline.inpaint import resolve_seed
    from moebius_jax.runtime import COMPILE_CACHE

    seed = resolve_seed(args.seed)

    failures = 0
    progress = tqdm(total=len(jobs), unit="image", desc="inpainting")
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        # Noise depends on (seed, position): chunk k uses seed + k * batch_size, so reruns match.
        results = pipe(
            [image for image, _, _ in chunk], [mask for _, mask, _ in chunk],
            steps=args.steps, guidance_scale=args.cfg, seed=seed + start, mask_dilate=args.mask_dilate,
            cfg_until=args.cfg_until,
            strength=args.strength, paste=not args.no_paste, compensate=args.compensate,
            noise_offset=args.noise_offset, reference_size=args.reference_size,
            resize_mask=args.resize_mask, batch_size=args.batch_size, on_error="skip",
            strategy=args.strategy, crop_margin=args.crop_margin,
        )
        for (_, _, out), result in zip(chunk, results):
            if result is None:
                failures += 1
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(out) as tmp:  # an interrupted save leaves no half image
                result.save(tmp, format=fmt)
        progress.update(len(chunk))
    progress.close()

    t = pipe.timing
    report = {
        "images": t.images, "failed": failures, "seed": seed, "compile_seconds": round(t.compile_seconds, 2),
        "seconds_per_image": round(t.run_seconds / t.images, 4) if t.images else None,
        "compile_cache": COMPILE_CACHE.as_dict(),
    }
    print(json.dumps(report), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
