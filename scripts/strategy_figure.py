"""Figure for the README: the two ways of inpainting a photo larger than the model's resolution.

    python scripts/strategy_figure.py                                  # tiny random-weight fixtures
    python scripts/strategy_figure.py --weights W --vae V [--config C]  # real weights

Writes docs/strategy_figure.png: input | mask (crop windows outlined) | resize result | crop
result. The photo is a demo photo (data/demo/chelsea.jpg; a synthetic picture when absent)
resized so its short side is 3x the model's resolution, with two holes far apart.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moebius_jax.pipeline import crop
from moebius_jax.pipeline.inpaint import InpaintPipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DEMO_PHOTO = ROOT / "data" / "demo" / "chelsea.jpg"
SCALE = 3  # photo short side / model resolution: large enough for the strategies to differ
PANEL_HEIGHT = 240
WINDOW_COLOUR = (255, 64, 64)


def demo_photo(short_side: int) -> Image.Image:
    """The demo photo (or a synthetic one) resized, aspect kept, to the given short side."""
    if DEMO_PHOTO.exists():
        photo = Image.open(DEMO_PHOTO).convert("RGB")
    else:  # a landscape of smooth colour bands with stripes, 3:2
        y, x = np.mgrid[0:300, 0:450] / 300.0
        rgb = np.stack([0.5 + 0.4 * np.sin(3 * x), 0.5 + 0.4 * np.cos(2 * y + x), 0.6 - 0.3 * y], -1)
        rgb = rgb * (0.85 + 0.15 * np.sign(np.sin(40 * x)))[..., None]
        photo = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    scale = short_side / min(photo.size)
    return photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)


def demo_mask(size: tuple[int, int]) -> Image.Image:
    """Two elliptic holes far apart, sized relative to the photo."""
    width, height = size
    radius = 0.07 * min(size)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy in ((0.3 * width, 0.6 * height), (0.78 * width, 0.3 * height)):
        draw.ellipse((cx - radius, cy - 0.7 * radius, cx + radius, cy + 0.7 * radius), fill=255)
    return mask


def panel(image: Image.Image, title: str, font: ImageFont.ImageFont) -> Image.Image:
    """The image scaled to the panel height, under a title strip."""
    width = round(image.width * PANEL_HEIGHT / image.height)
    out = Image.new("RGB", (width, PANEL_HEIGHT + 24), "white")
    out.paste(image.convert("RGB").resize((width, PANEL_HEIGHT), Image.Resampling.LANCZOS), (0, 24))
    ImageDraw.Draw(out).text((4, 4), title, fill="black", font=font)
    return out


def figure(panels: list[Image.Image], caption: str, font: ImageFont.ImageFont) -> Image.Image:
    """Panels side by side, 6 px apart, with a caption line below."""
    gap = 6
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (width, panels[0].height + 28), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    ImageDraw.Draw(out).text((4, panels[0].height + 6), caption, fill="black", font=font)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(FIXTURES / "moebius_tiny" / "diffusion_pytorch_model.bin"))
    p.add_argument("--vae", default=str(FIXTURES / "vae_tiny"))
    p.add_argument("--config", default=None, help="model YAML (default: the tiny fixture's with the default weights)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "docs" / "strategy_figure.png"))
    args = p.parse_args(argv)
    tiny = args.weights == p.get_default("weights")
    config = args.config or (FIXTURES / "moebius_tiny" / "config.yaml" if tiny else None)

    pipe = InpaintPipeline.from_pretrained(args.weights, args.vae, config=config)
    photo = demo_photo(SCALE * pipe.resolution)
    mask = demo_mask(photo.size)
    resized, cropped = (pipe(photo, mask, steps=args.steps, strategy=s)[0] for s in ("resize", "crop"))

    # Outline the crop windows on the mask panel; lines 1/120 of the height stay visible when scaled.
    shown_mask = mask.convert("RGB")
    draw = ImageDraw.Draw(shown_mask)
    for window in crop.plan_windows(np.asarray(mask) >= 128, pipe.resolution):
        left, top, right, bottom = window.box
        draw.rectangle((left, top, right - 1, bottom - 1), outline=WINDOW_COLOUR, width=max(1, photo.height // 120))

    font = ImageFont.load_default(14)
    w, h = photo.size
    res = pipe.resolution
    panels = [
        panel(photo, f"input {w}x{h}", font),
        panel(shown_mask, f"mask; crop windows ({res} px)", font),
        panel(resized, "strategy=resize", font),
        panel(cropped, "strategy=crop", font),
    ]
    weights = "tiny random-weight test fixture, so the fills are noise; only the mechanics show" if tiny \
        else f"weights {pathlib.Path(args.weights).name}, {args.steps} steps"
    caption = (f"Model resolution {res} px ({weights}). resize: the whole photo at {res} px short side, "
               f"fill upsampled {min(w, h) / res:.0f}x; crop: each hole in its own {res} px window at full scale.")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(panels, caption, font).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
