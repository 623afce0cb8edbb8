"""FID exactly as pytorch-fid 0.3.0 computes it: pool3 features of its Inception, float64
mean and unbiased covariance, and the Frechet distance with its eps fallback.

The statistics and the distance run in float64 numpy on the host: a float32 (or bf16)
2048x2048 product with eigenvalues near zero is not accurate enough.

The matrix square root. pytorch-fid takes tr(sqrtm(s1 @ s2)) with scipy's Schur method
and keeps the real part. The diagonal of that triangular root is the principal square root
of the Schur diagonal, i.e. of the eigenvalues of s1 @ s2, so the trace is
sum(Re sqrt(eigvals(s1 @ s2))) with complex square roots; we compute that from numpy's
eigenvalues (float64 LAPACK, no scipy, never inf). On full-rank statistics it matches scipy
to ~1e-14 relative. With rank-deficient covariances (fewer images than dimensions) each
null eigenvalue is rounding noise whose square root (~1e-8) enters the trace in scipy as
here; the FIDs then agree to ~1e-9 relative, the level by which even a permutation of the
feature order moves either result.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moebius_jax.eval import weights
from moebius_jax.eval.inception import INCEPTION_SIZE, POOL3_DIMS, FIDInceptionV3, resize_for_inception


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionStats:
    """Streaming float64 mean and covariance of feature rows (immutable: `update` and
    `merge` return new statistics). Batches are combined with the pairwise (Chan et al.)
    update of the centred scatter matrix, so any split, in any order, equals the one-shot
    np.mean / np.cov to rounding; shards from several hosts combine with `merge`."""

    count: int
    mean: np.ndarray  # (D,)
    scatter: np.ndarray  # (D, D): sum of outer products of deviations from `mean`

    @classmethod
    def empty(cls, dims: int = POOL3_DIMS) -> InceptionStats:
        return cls(0, np.zeros(dims), np.zeros((dims, dims)))

    @classmethod
    def from_features(cls, features: Any) -> InceptionStats:
        """Statistics of an (N, D) feature array (copied to float64, as pytorch-fid does)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        if len(f) == 0:
            return cls.empty(f.shape[1])
        mean = f.mean(axis=0)
        centred = f - mean
        return cls(f.shape[0], mean, centred.T @ centred)

    def update(self, features: Any) -> InceptionStats:
        """These statistics plus the rows of an (N, D) feature batch."""
        return self.merge(InceptionStats.from_features(features))

    def merge(self, other: InceptionStats) -> InceptionStats:
        """Statistics of the union of both sets of rows."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge statistics of {self.mean.shape[0]} and {other.mean.shape[0]} dims")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        return InceptionStats(n, mean, scatter)

    def cov(self, ddof: int = 1) -> np.ndarray:
        """Covariance; ddof=1 is np.cov's unbiased estimate that pytorch-fid uses (MAT's and
        StyleGAN2-ADA's metric code use ddof=0)."""
        if self.count <= ddof:
            raise ValueError(f"covariance with ddof={ddof} needs more than {ddof} rows, have {self.count}")
        return self.scatter / (self.count - ddof)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float | None:
    """tr(sqrtm(sigma1 @ sigma2)).real, or None when the product is exactly singular.

    An eigenvalue that is exactly 0.0 only comes from exact structure (e.g. a feature that is
    constant over a whole set); that is the case where scipy's Schur recurrence divides by
    sqrt(0) + sqrt(0) and pytorch-fid falls back to eps. The ~1e-16 noise eigenvalues of
    merely rank-deficient covariances do not trigger it, in scipy as here.
    """
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    if not np.all(np.isfinite(eig)) or np.any(eig == 0):
        return None
    roots = np.sqrt(eig.astype(np.complex128))  # principal branch, as the Schur method takes
    # pytorch-fid rejects a root whose diagonal has an imaginary part above 1e-3; for a
    # product of two PSD matrices that only happens with a clearly negative eigenvalue.
    worst = float(np.max(np.abs(roots.imag)))
    if worst > 1e-3:
        raise ValueError(f"Imaginary component {worst}")
    return float(np.sum(roots.real))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), in float64, not clipped (a set
    against itself can come out slightly negative). If the product is singular, eps * I is
    added to both covariances, with a warning, as pytorch-fid does."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not fit means of length {mu1.shape[0]}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    if tr_covmean is None:
        warnings.warn(
            f"FID: the covariance product is singular; adding {eps} to the diagonal of both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
        if tr_covmean is None:
            raise ValueError(f"FID: the covariance product is singular even with {eps} added to the diagonal")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def load_fid_inception(path: str | os.PathLike | None) -> tuple[FIDInceptionV3, Any]:
    """(module, variables) of pytorch-fid's Inception from `pt_inception-2015-12-05-6726825d.pth`
    (see `weights.FID_INCEPTION_URL`)."""
    module = FIDInceptionV3()
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, INCEPTION_SIZE, INCEPTION_SIZE, 3)))
    variables = weights.fid_inception_variables(path, target)
    return module, jax.tree.map(jnp.asarray, variables)


@functools.partial(jax.jit, static_argnames="module")
def _pool3(module: FIDInceptionV3, variables: Any, images: jnp.ndarray) -> jnp.ndarray:
    return module.apply(variables, images)


@jax.jit
def _to_inception_input(images: jnp.ndarray) -> jnp.ndarray:
    if images.dtype == jnp.uint8:  # ToTensor: uint8 / 255 in float32
        images = images.astype(jnp.float32) / 255.0
    return resize_for_inception(images.astype(jnp.float32))


def inception_features(module: FIDInceptionV3, variables: Any, images: Any) -> jnp.ndarray:
    """(N, 2048) float32 pool3 features of an NHWC batch, uint8 or float in [0, 1].

    The 299x299 resize runs first and separately, so the network compiles once per batch
    size whatever the image resolution (resizing 299 -> 299 inside it is the identity).
    """
    return _pool3(module, variables, _to_inception_input(jnp.asarray(images)))
