"""`InpaintPipeline`: images + masks in, inpainted PIL images out.

One image travels: `load_pair` (any mode, EXIF applied; the mask binarised and optionally
dilated, once) -> windows to run (`strategy="crop"`: context windows around the mask,
`moebius_jax.pipeline.crop`; `"resize"`: the whole image) -> per window `prepare` (resize to a
multiple of 64, latent mask) -> `Sampler` (encode, 19 DDIM+CFG steps, decode; one jit) ->
uint8 -> paste into the untouched original at its own size (or, with `reference_size=True`,
the reference's resized output).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import secrets
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from moebius_jax import hub, runtime
from moebius_jax.config import ModelConfig, default_model_config, load_config
from moebius_jax.convert.orbax_io import CONFIG_FILE, is_orbax_dir
from moebius_jax.dtypes import DTYPES
from moebius_jax.loading import load_model
from moebius_jax.models.removal_model import RemovalModel
from moebius_jax.models.vae import AutoencoderKL
from moebius_jax.pipeline import crop
from moebius_jax.pipeline.image_io import ImageSource
from moebius_jax.pipeline.postprocess import paste as paste_at_size
from moebius_jax.pipeline.postprocess import paste_back_to_original, paste_compensate, to_uint8
from moebius_jax.pipeline.preprocess import Prepared, load_pair, prepare, source_name
from moebius_jax.pipeline.sampler import Sampler, SamplerNoise, SamplerSettings
from moebius_jax.vae_loading import load_vae

log = logging.getLogger(__name__)

RANDOM_SEED = -1  # asks for a seed drawn at random (and reported)
HUGE_SIDE = 4096  # beyond this we warn: the model runs at `resolution` and the paste upsamples a lot
STRATEGIES = ("crop", "resize")


@dataclasses.dataclass(frozen=True)
class _Job:
    """One window of one image on its way through the model."""

    index: int  # the image's position in the call
    number: int  # the window's position among the image's windows
    key: jax.Array  # its noise key
    box: crop.Box  # the window in the image
    image: Image.Image  # the window cut from the image
    paste_mask: Image.Image  # the mask pixels this window pastes (L, 255 = fill)
    prepared: Prepared  # from the window and every hole in it


def resolve_seed(seed: int) -> int:
    """`seed` itself, or for `RANDOM_SEED` (-1) a fresh random one, logged so a result can be redone."""
    if seed == RANDOM_SEED:
        seed = secrets.randbelow(2**31)
        log.info("random seed: %d", seed)
    elif seed < 0:
        raise ValueError(f"seed must be >= 0, or -1 for a random one; got {seed}")
    return seed


def window_key(call_key: jax.Array, index: int | jax.Array, number: int = 0) -> jax.Array:
    """The noise key of window `number` of image `index` in a call seeded with `call_key`.

    It depends on nothing else, so batching never changes the noise. An image's first window
    uses the image's key, so a whole-image window is exactly the resize path (and the exported
    sampler's image `index`); further windows fold in their number.
    """
    image_key = jax.random.fold_in(call_key, index)
    return image_key if number == 0 else jax.random.fold_in(image_key, number)


def batch_noise(keys: Sequence[jax.Array], latent_hw: tuple[int, int]) -> SamplerNoise:
    """The sampler's draws for a batch, one image per key."""
    draws = [SamplerNoise.draw(key, 1, latent_hw) for key in keys]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *draws)


@dataclasses.dataclass
class Timing:
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    images: int = 0


class InpaintPipeline:
    """Moebius inpainting: `pipe(images, masks)` -> list of PIL images.

    Masks: white (>= 128) marks the region to fill. Images in a call that resize to the same
    size run together in batches of `batch_size`; each image's noise depends only on `seed`
    and its position in the call, so batching changes a result by float rounding at most
    (a batched convolution may round differently: rarely, a pixel moves by 1).
    """

    def __init__(self, model: RemovalModel, unet_variables: Any, vae: AutoencoderKL, vae_variables: Any,
                 *, resolution: int = 512):
        self.sampler = Sampler(model, vae)  # spreads each batch over the local devices
        self.model, self.unet_variables = model, self.sampler.place(unet_variables)
        self.vae, self.vae_variables = vae, self.sampler.place(vae_variables)
        self.resolution = resolution
        self.timing = Timing()
        self.last_seed: int | None = None  # the seed of the latest call (after resolving -1)

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        config: str | os.PathLike | ModelConfig | None = None,
        dtype: str = "float32",
        resolution: int | None = None,
        *,
        variant: str | None = None,
        compile_cache: str | os.PathLike | None = None,
    ) -> InpaintPipeline:
        """Load the student and the VAE: local paths or Hugging Face ids; by default the
        released student `variant` (`hub.VARIANTS`, default "pretrained") and VAE, fetched
        and converted once.

        `config` defaults to the one saved with converted weights, else the paper's model
        (`configs/moebius.yaml`); `resolution` to its image size. JAX's persistent compilation
        cache is turned on (`runtime.enable_compilation_cache(compile_cache)`; "off" to skip).
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        weights = hub.student_choice(weights, variant)
        runtime.enable_compilation_cache(compile_cache)
        vae = hub.DEFAULT_VAE if vae is None else vae
        if config is None:
            saved = pathlib.Path(weights) / CONFIG_FILE
            config = saved if is_orbax_dir(weights) and saved.exists() else default_model_config()
        cfg = load_config(config)
        model, unet_variables = load_model(cfg, weights, dtype=DTYPES[dtype])
        vae_module, vae_variables = load_vae(vae, dtype=DTYPES[dtype])
        return cls(model, unet_variables, vae_module, vae_variables, resolution=resolution or cfg.image_size)

    def __call__(
        self,
        images: ImageSource | Sequence[ImageSource],
        masks: ImageSource | Sequence[ImageSource],
        steps: int = 20,
        guidance_scale: float = 2.5,
        seed: int = 0,
        strength: float = 0.99,
        paste: bool = True,
        compensate: bool = False,
        *,
        mask_dilate: int = 0,
        cfg_until: int | None = None,
        noise_offset: float = 0.0357,
        resolution: int | None = None,
        reference_size: bool = False,
        resize_mask: bool = False,
        batch_size: int = 8,
        on_error: str = "raise",
        strategy: str = "crop",
        crop_margin: float = crop.DEFAULT_MARGIN,
    ) -> list[Image.Image | None]:
        """Inpaint `images` (PIL, paths or arrays; one or a list) with `masks` (same forms).

        `strategy="crop"` runs the model on square windows around the mask, at least
        `resolution` px with `crop_margin` x the hole's size of context on each side, and
        pastes them back: pixels outside the windows are the input's. A window that would
        reach the image's short side becomes the whole image, so an image whose short side is
        at most `resolution` gives exactly the `"resize"` result: the whole image with its short
        side resized to `resolution`. `reference_size=True` always runs the whole image.

        `mask_dilate=k` grows every hole by a k × k square first (`preprocess.hole_mask`).
        `cfg_until=k` applies guidance on the first k steps only (None: all). `seed=-1` draws
        a random seed, logs it and keeps it in `last_seed`.

        Bad inputs (unreadable file, mask of another size, image too small) raise ValueError
        naming the file; with `on_error="skip"` they are logged and their result is None.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if mask_dilate < 0:  # checked here, not per image: it is not the image's fault
            raise ValueError(f"mask_dilate must be >= 0 (0 = off), got {mask_dilate}")
        single = isinstance(images, (str, os.PathLike, Image.Image, np.ndarray))
        images = [images] if single else list(images)
        masks = [masks] if single else list(masks)
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        resolution = resolution or self.resolution
        settings = SamplerSettings(num_steps=steps, strength=strength)
        self.last_seed = seed = resolve_seed(seed)
        key = jax.random.key(seed)

        results: list[Image.Image | None] = [None] * len(images)
        originals: dict[int, Image.Image] = {}
        pieces: dict[int, list[tuple[_Job, np.ndarray] | None]] = {}  # per image, per window
        pending: dict[tuple[int, int], list[_Job]] = {}
        for i, (image_src, mask_src) in enumerate(zip(images, masks)):
            try:
                image, mask = load_pair(image_src, mask_src, resize_mask=resize_mask, mask_dilate=mask_dilate)
                hole = np.asarray(mask) > 0
                if not np.any(hole):
                    results[i] = image.copy()  # nothing to fill: the input, untouched, no model call
                    continue
                if strategy == "resize" or reference_size:
                    windows = [crop.Window((0, 0, *image.size), hole)]
                else:
                    windows = crop.plan_windows(hole, resolution, crop_margin)
                jobs = [self._job(i, j, key, image, mask, window, resolution)
                        for j, window in enumerate(windows)]
            except ValueError as e:  # ImageLoadError included
                if on_error == "raise":
                    raise
                log.error("skipping %s: %s", source_name(image_src), e)
                continue
            originals[i], pieces[i] = image, [None] * len(jobs)
            for job in jobs:
                if max(job.image.size) > HUGE_SIDE:
                    log.warning("%s: a %dx%d window runs at %d px and its result is upsampled back",
                                source_name(image_src), *job.image.size, resolution)
                pending.setdefault(job.prepared.resized_size, []).append(job)

        for group in pending.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                for job, result in zip(chunk, self._run(chunk, guidance_scale, noise_offset, settings, cfg_until)):
                    pieces[job.index][job.number] = job, result
        for i, image in originals.items():
            results[i] = Image.fromarray(self._assemble(image, pieces[i], paste, compensate, reference_size))
        self.timing.images += len(originals)  # images, not windows: per-image cost stays comparable
        return results

    @staticmethod
    def _job(index: int, number: int, key: jax.Array, image: Image.Image, mask: Image.Image,
             window: crop.Window, resolution: int) -> _Job:
        """Cut one window from the image and prepare it; the model sees every hole inside it."""
        job_key = window_key(key, index, number)
        window_image, window_mask = image.crop(window.box), mask.crop(window.box)
        paste_mask = Image.fromarray(window.region.astype(np.uint8) * np.uint8(255))
        return _Job(index, number, job_key, window.box, window_image, paste_mask,
                    prepare(window_image, window_mask, resolution))

    def _run(self, chunk: list[_Job], guidance_scale, noise_offset, settings, cfg_until) -> np.ndarray:
        prepared = [job.prepared for job in chunk]
        h, w = prepared[0].latent_mask.shape[:2]
        noise = batch_noise([job.key for job in chunk], (h, w))
        compile_before = self.sampler.compile_seconds
        start = time.perf_counter()
        out = self.sampler(
            self.unet_variables, self.vae_variables,
            np.stack([p.image for p in prepared]), np.stack([p.masked_image for p in prepared]),
            np.stack([p.latent_mask for p in prepared]), noise,
            guidance_scale=guidance_scale, noise_offset=noise_offset, settings=settings, cfg_until=cfg_until,
        )
        decoded = to_uint8(np.asarray(out.decoded))
        compiled = self.sampler.compile_seconds - compile_before
        self.timing.compile_seconds += compiled
        self.timing.run_seconds += time.perf_counter() - start - compiled
        return decoded

    def _assemble(self, image: Image.Image, pieces: list[tuple[_Job, np.ndarray]],
                  paste: bool, compensate: bool, reference_size: bool) -> np.ndarray:
        """The image with each window's result pasted in turn (each over the previous ones, so
        windows may overlap); with `reference_size` the single whole-image result as it is."""
        if reference_size:
            ((job, result),) = pieces
            return self._finish(result, job.image, job.paste_mask, job.prepared, paste, compensate, True)
        canvas = np.asarray(image)
        for job, result in pieces:
            left, top, right, bottom = job.box
            base = Image.fromarray(canvas[top:bottom, left:right])
            piece = self._finish(result, base, job.paste_mask, job.prepared, paste, compensate, False)
            canvas = crop.paste_window(canvas, piece, job.box)
        return canvas

    @staticmethod
    def _finish(result: np.ndarray, image: Image.Image, mask: Image.Image, prepared: Prepared,
                paste: bool, compensate: bool, reference_size: bool) -> np.ndarray:
        if reference_size:  # the reference's output: the resized multiple-of-64 image
            if not paste:
                return result
            blend = paste_compensate if compensate else paste_at_size
            return blend(result, prepared.resized_image, prepared.resized_mask)
        if not paste:
            return np.asarray(Image.fromarray(result).resize(image.size, Image.Resampling.LANCZOS))
        return paste_back_to_original(result, image, mask, compensate=compensate)
