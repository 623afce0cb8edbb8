"""PSNR and SSIM as scikit-image 0.26 computes them, in float64 numpy on the host.

Images are uint8 (or any numbers on a 0..data_range scale), NHWC, or one HWC image. Values
are per image; a data set's figure is the mean over images (MAT's protocol). float64 is
needed: E[x^2] - E[x]^2 at the 0..255 scale loses digits in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# SSIM stabilisers, relative to the data range (Wang et al. 2004).
_K1, _K2 = 0.01, 0.03


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both images as float64 (N, H, W, C) and whether a single HWC image was given."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected an HWC image or an NHWC batch, got shape {a.shape}")
    single = a.ndim == 3
    a, b = (np.asarray(x, np.float64)[None] if single else np.asarray(x, np.float64) for x in (a, b))
    return a, b, single


def _result(values: np.ndarray, single: bool) -> float | np.ndarray:
    return float(values[0]) if single else values


def psnr(a: Any, b: Any, data_range: float = 255.0) -> float | np.ndarray:
    """10 log10(data_range^2 / MSE), the MSE over every pixel and channel; +inf if equal."""
    a, b, single = _pair(a, b)
    mse = np.mean(np.square(a - b), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):  # identical images: +inf, as skimage returns
        values = 10 * np.log10(data_range**2 / mse)
    return _result(values, single)


def _valid_filter(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation of (N, H, W, C) with the 1-D `taps` over H and W, keeping only
    windows fully inside the image: skimage filters everything, then crops the border
    (win_size - 1) / 2 wide, which leaves exactly these windows."""
    k = len(taps)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(t * x[:, i : i + h] for i, t in enumerate(taps))
    return sum(t * rows[:, :, i : i + w] for i, t in enumerate(taps))


def _window(variant: str) -> tuple[np.ndarray, float]:
    """1-D window taps and the covariance normalisation of an SSIM variant."""
    if variant == "skimage":  # 7x7 uniform window, sample covariance (49/48)
        return np.full(7, 1 / 7), 49 / 48
    if variant == "gaussian":  # sigma 1.5 truncated at 3.5 sigma -> radius 5, 11 taps
        x = np.arange(-5, 6, dtype=np.float64)
        g = np.exp(-0.5 * (x / 1.5) ** 2)
        return g / g.sum(), 1.0
    raise ValueError(f"unknown SSIM variant {variant!r}; expected 'skimage' or 'gaussian'")


def ssim(a: Any, b: Any, variant: str = "skimage", data_range: float = 255.0) -> float | np.ndarray:
    """Mean SSIM over the fully-inside windows of each channel, averaged over channels.

    variant="skimage": structural_similarity(a, b, channel_axis=-1, data_range=255) with its
    defaults (7x7 uniform window, sample covariance). variant="gaussian": the same with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False -- Wang et al.'s setting
    that inpainting papers (and MAT's script) usually mean by SSIM.
    """
    taps, cov_norm = _window(variant)
    a, b, single = _pair(a, b)
    if min(a.shape[1:3]) < len(taps):
        raise ValueError(f"images of {a.shape[1:3]} are smaller than the {len(taps)}x{len(taps)} SSIM window")
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    ux, uy = _valid_filter(a, taps), _valid_filter(b, taps)
    vx = cov_norm * (_valid_filter(a * a, taps) - ux * ux)
    vy = cov_norm * (_valid_filter(b * b, taps) - uy * uy)
    vxy = cov_norm * (_valid_filter(a * b, taps) - ux * uy)
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return _result(np.mean(np.mean(s, axis=(1, 2)), axis=-1), single)
