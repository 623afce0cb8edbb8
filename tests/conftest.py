"""Shared test helpers: where the reference fixtures live and how parity is judged."""

from __future__ import annotations

import contextlib
import os
import pathlib

import jax
import numpy as np
import pytest

import moebius_jax
from moebius_jax.pipeline.inpaint import InpaintPipeline, Timing
from moebius_jax.vae_loading import load_vae

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# Many tests (and the CLI subprocesses they start) compile the same tiny networks; a
# persistent compilation cache turns the repeats into lookups.
_CACHE = str(ROOT / ".pytest_cache" / "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def fixture_path(*parts: str) -> pathlib.Path:
    """Path of a committed reference fixture (copied from the measured reference runs)."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"missing test fixture {path}")
    return path


def load_npz(*parts: str) -> dict[str, np.ndarray]:
    with np.load(fixture_path(*parts), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(x), 1, -1)


def assert_parity(ours, ref, rel: float = 1e-4, name: str = "") -> None:
    """The project's parity rule: max |ours - ref| <= rel * max |ref| (float32 default 1e-4)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    assert err <= rel * scale, f"{name}: max|ours-ref| = {err:.3e} > {rel:g} * max|ref| ({scale:.3e})"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


# -- shared compiled programs -----------------------------------------------------------------
# Compiling is most of this suite's time. Tests that run a tiny fixture network take it, and
# its jitted apply, from these session fixtures: one object per process, so each input shape
# traces and compiles once however many tests and files use it.

TINY_STUDENT_CONFIG = FIXTURES / "moebius_tiny" / "config.yaml"
TINY_STUDENT_WEIGHTS = FIXTURES / "moebius_tiny" / "diffusion_pytorch_model.bin"
TINY_VAE = FIXTURES / "vae_tiny"
MICRO_STUDENT_CONFIG = ROOT / "tests" / "configs" / "moebius_micro.yaml"

# Trainer runs in tests: 64 px images (8x8 latents), float32, task loss only, AdamW (its step
# compiles in half Muon's time). Tests of the trainer's plumbing (resume, export, the CLI,
# sweeps) add MICRO_TRAIN, so they all compile, or find in the cache, one train-step program.
FAST_TRAIN = ["data.image_size=64", "data.mask_config=random_medium_256", "data.batch_size=2", "data.num_workers=0",
              "log_every=1", "sample_every=0", "dtype=float32", "optimizer.name=adamw"]
MICRO_TRAIN = [*FAST_TRAIN, f"model={MICRO_STUDENT_CONFIG}"]


@pytest.fixture(scope="session")
def tiny_student():
    """(model, variables) of the tiny student with the fixture weights (float32)."""
    return moebius_jax.load_model(TINY_STUDENT_CONFIG, TINY_STUDENT_WEIGHTS)


@pytest.fixture(scope="session")
def tiny_student_apply(tiny_student):
    """The tiny student's eval-mode forward, jitted: (variables, x, t, ids) -> UNetOutput."""
    return jax.jit(tiny_student[0].apply)


@pytest.fixture(scope="session")
def tiny_vae():
    """(vae, variables) of the tiny VAE with the fixture weights (float32)."""
    return load_vae(TINY_VAE)


@pytest.fixture(scope="session")
def tiny_pipeline():
    """InpaintPipeline of the tiny student and VAE (float32, 128 px): its sampler compiles each
    batch shape once per process, for every test that inpaints with it."""
    return InpaintPipeline.from_pretrained(TINY_STUDENT_WEIGHTS, TINY_VAE, config=TINY_STUDENT_CONFIG)


@contextlib.contextmanager
def commands_use(pipeline: InpaintPipeline):
    """Within it, commands (infer.main, eval.run) that load the tiny fixture files in float32 get
    `pipeline`, with fresh timing as a fresh load has, instead of a new pipeline that compiles its
    sampler again; other loads go through. Yields the list of the shared loads' arguments."""
    real, loads = InpaintPipeline.from_pretrained, []

    def load(weights=None, vae=None, config=None, dtype="float32", resolution=None, **options):
        paths = tuple(None if p is None else pathlib.Path(p) for p in (weights, vae, config))
        if paths != (TINY_STUDENT_WEIGHTS, TINY_VAE, TINY_STUDENT_CONFIG) or dtype != "float32" or \
                resolution not in (None, pipeline.resolution) or options.get("variant") is not None:
            return real(weights, vae, config, dtype, resolution, **options)
        loads.append(repr((weights, vae, config, dtype, resolution, sorted(options.items()))))
        pipeline.timing = Timing()
        return pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InpaintPipeline, "from_pretrained", staticmethod(load))
        yield loads


@pytest.fixture
def commands_use_tiny_pipeline(tiny_pipeline):
    """For one test: commands loading the tiny fixture files get the session's tiny pipeline."""
    with commands_use(tiny_pipeline) as loads:
        yield loads
