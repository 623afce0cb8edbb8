"""Inpaint images with Moebius.

One pair:     python infer.py --weights W --vae V --image photo.jpg --mask mask.png --out result.png
A folder:     python infer.py --weights W --vae V --image-dir photos/ --mask-dir masks/ --out-dir results/

Masks are white (>= 128) where the image should be filled. Folder pairs are matched by file
stem; files without a partner are listed, not silently skipped, and a folder holding two files
with one stem (a.jpg and a.png) is refused, naming them. Results keep the input's size
and, outside the blurred mask border, its exact pixels (`--reference-size` gives the
reference's resized output instead). `--strategy crop` (default) fills the mask in square
windows around it at the model's own scale, `--strategy resize` runs the whole photo with its
short side resized to the model's resolution; both agree when the short side is at most that.
`--weights` may be a .bin / .safetensors / EMA file, a directory from
`python -m moebius_jax.convert`, or a Hugging Face id `org/repo/path` (fetched and converted
once into ~/.cache/moebius_jax).
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

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--weights", required=True, help="student weights (file, converted dir or HF id)")
    p.add_argument("--vae", required=True, help="VAE: diffusers folder, LDM file, converted dir or HF id")
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
    s.add_argument("--seed", type=int, default=0)
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
    args = p.parse_args(argv)
    single = [args.image, args.mask, args.out]
    folder = [args.image_dir, args.mask_dir, args.out_dir]
    if any(single) == any(folder):
        p.error("give either --image/--mask/--out or --image-dir/--mask-dir/--out-dir")
    if any(single) and not all(single):
        p.error("--image, --mask and --out go together")
    if any(folder) and not all(folder):
        p.error("--image-dir, --mask-dir and --out-dir go together")
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
    from moebius_jax import hub
    from moebius_jax.convert.orbax_io import is_orbax_dir, save_variables
    from moebius_jax.loading import load_model
    from moebius_jax.pipeline.inpaint import InpaintPipeline

    weights = hub.resolve(args.weights)
    vae = hub.resolve(args.vae)
    if not pathlib.Path(args.weights).expanduser().exists() and not is_orbax_dir(weights):
        # Fetched from the Hub: convert once so later runs load the orbax copy directly.
        cached = hub.converted_cache_dir(weights)
        if not is_orbax_dir(cached):
            config = args.config or None
            from moebius_jax.config import default_model_config
            _, variables = load_model(config or default_model_config(), weights)
            save_variables(cached, variables)
        weights = cached
    return InpaintPipeline.from_pretrained(weights, vae, config=args.config, dtype=args.dtype,
                                           resolution=args.resolution)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    log = logging.getLogger("infer")
    from tqdm import tqdm

    jobs, fmt = plan_jobs(args, log)
    with cli.user_inputs():
        pipe = load_pipeline(args)

    failures = 0
    progress = tqdm(total=len(jobs), unit="image", desc="inpainting")
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        # Noise depends on (seed, position): chunk k uses seed + k * batch_size, so reruns match.
        results = pipe(
            [image for image, _, _ in chunk], [mask for _, mask, _ in chunk],
            steps=args.steps, guidance_scale=args.cfg, seed=args.seed + start,
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
        "images": t.images, "failed": failures, "compile_seconds": round(t.compile_seconds, 2),
        "seconds_per_image": round(t.run_seconds / t.images, 4) if t.images else None,
    }
    print(json.dumps(report), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
