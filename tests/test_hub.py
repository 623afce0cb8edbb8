"""Weights by Hugging Face id, the no-flag first run, offline errors and the compilation cache.

No network: a local folder laid out like huggingface_hub's cache (`models--org--repo/blobs`,
`snapshots/<rev>/...`, `refs/main`) holds the tiny fixtures under the released names, and
HF_HUB_OFFLINE=1 makes the real huggingface_hub code read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import huggingface_hub.constants
import jax
import numpy as np
import pytest
from conftest import ROOT, fixture_path
from PIL import Image, ImageDraw

import infer
from moebius_jax import hub, loading, runtime
from moebius_jax.eval.run import parse_args as eval_args
from moebius_jax.eval.run import run_settings
from moebius_jax.loading import load_model
from moebius_jax.vae_loading import load_vae

TINY_CONFIG = fixture_path("moebius_tiny", "config.yaml")
TINY_WEIGHTS = fixture_path("moebius_tiny", "diffusion_pytorch_model.bin")
TINY_VAE = fixture_path("vae_tiny")
REVISION = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(root: pathlib.Path) -> pathlib.Path:
    """huggingface_hub's cache layout with the tiny student and VAE under the released names."""
    files = {
        hub.STUDENT_REPO: {f"{v}/{hub.STUDENT_FILE}": TINY_WEIGHTS for v in ("pretrained", "ft_ffhq")},
        "hustvl/PixelHacker": {f"vae/{p.name}": p for p in TINY_VAE.iterdir() if p.suffix in (".json", ".safetensors")},
    }
    for repo, entries in files.items():
        folder = root / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(REVISION)
        for name, source in entries.items():
            blob = folder / "blobs" / hashlib.sha256(f"{repo}/{name}".encode()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(source, blob)
            link = folder / "snapshots" / REVISION / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return root


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hub cache, offline, and a private moebius-jax cache; returns (hub cache, our cache)."""
    hub_cache, our_cache = tmp_path / "hf", tmp_path / "moebius"
    hub_cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(runtime.CACHE_ENV, str(our_cache))
    return hub_cache, our_cache


@pytest.fixture
def hub_cache(offline):
    build_hub_cache(offline[0])
    return offline


def _equal_trees(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_hub_ids_are_recognised():
    assert hub.is_hub_id("hustvl/Moebius/pretrained/diffusion_pytorch_model.bin")
    assert hub.is_hub_id("hustvl/PixelHacker/vae") and hub.is_hub_id("org/repo")
    assert not hub.is_hub_id(str(TINY_WEIGHTS))  # exists locally
    assert not hub.is_hub_id("./org/repo") and not hub.is_hub_id("~/x/y") and not hub.is_hub_id("single")
    assert hub.student_weights("ft_ffhq") == "hustvl/Moebius/ft_ffhq/diffusion_pytorch_model.bin"
    with pytest.raises(ValueError, match="ft_places2"):
        hub.student_weights("places")
    assert hub.student_choice(None, None) == hub.student_weights("pretrained")
    assert hub.student_choice("w.bin", None) == "w.bin"
    with pytest.raises(ValueError, match="cannot be combined"):
        hub.student_choice("w.bin", "ft_ffhq")
    assert hub.canonical("hustvl/PixelHacker/vae") == "hustvl/PixelHacker/vae"
    assert hub.canonical(os.path.relpath(TINY_VAE)) == str(TINY_VAE)


def test_fetch_reads_the_snapshot_named_by_refs_main(hub_cache):
    path = hub.fetch(hub.student_weights())
    assert path == hub_cache[0] / "models--hustvl--Moebius" / "snapshots" / REVISION / "pretrained" / hub.STUDENT_FILE
    assert path.read_bytes() == TINY_WEIGHTS.read_bytes()
    # A folder id takes the first of the candidate names it holds (no .safetensors here).
    assert hub.fetch("hustvl/Moebius/ft_ffhq", hub.WEIGHT_FILES).name == hub.STUDENT_FILE


def test_offline_without_cache_says_what_was_tried_and_what_to_do(offline):
    with pytest.raises(hub.HubError) as err:
        hub.fetch("hustvl/PixelHacker/vae", hub.WEIGHT_FILES)
    message = str(err.value)
    for needle in ("hustvl/PixelHacker/vae/diffusion_pytorch_model.safetensors",
                   "hustvl/PixelHacker/vae/diffusion_pytorch_model.bin", str(offline[0]), "--weights", "--vae"):
        assert needle in message
    assert isinstance(err.value, FileNotFoundError)  # what every CLI already reports cleanly


def test_loaders_take_hub_ids_and_convert_once(hub_cache, monkeypatch, tiny_student, tiny_vae):
    _, local = tiny_student
    _, fetched = load_model(TINY_CONFIG, hub.student_weights())
    assert _equal_trees(fetched, local)
    converted = list((hub_cache[1] / "converted").iterdir())
    assert [p.name.split("-")[0] for p in converted] == ["unet"]

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the converted copy should have been used")

    monkeypatch.setattr(loading, "load_torch_variables", no_second_conversion)
    _, again = load_model(TINY_CONFIG, hub.student_weights())
    assert _equal_trees(again, local)

    vae, vae_local = tiny_vae
    hub_vae, vae_fetched = load_vae(hub.DEFAULT_VAE)
    assert hub_vae.config == vae.config and _equal_trees(vae_fetched, vae_local)
    assert sorted(p.name.split("-")[0] for p in (hub_cache[1] / "converted").iterdir()) == ["unet", "vae"]


def test_infer_offline_without_cache_exits_with_the_message(offline, tmp_path, capsys):
    image, mask = _pair(tmp_path)
    code = infer.main(["--image", str(image), "--mask", str(mask), "--out", str(tmp_path / "r.png")])
    assert code == 1
    err = capsys.readouterr().err
    assert "hustvl/Moebius/pretrained/diffusion_pytorch_model.bin" in err
    assert str(offline[0]) in err and "--weights" in err and "Traceback" not in err
    assert not (tmp_path / "r.png").exists()


def test_eval_records_hub_ids_as_they_are(tmp_path):
    args = eval_args(["--benchmark", str(tmp_path), "--out", str(tmp_path / "o"), "--variant", "ft_ffhq"])
    settings = run_settings(args, 512)
    assert settings["weights"] == "hustvl/Moebius/ft_ffhq/diffusion_pytorch_model.bin"
    assert settings["vae"] == hub.DEFAULT_VAE
    args = eval_args(["--benchmark", str(tmp_path), "--out", str(tmp_path / "o"), "--weights", str(TINY_WEIGHTS)])
    assert run_settings(args, 512)["weights"] == str(TINY_WEIGHTS)
    with pytest.raises(SystemExit):
        eval_args(["--benchmark", "b", "--out", "o", "--weights", "w", "--variant", "ft_ffhq"])


def test_compilation_cache_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, "off")
    assert runtime.enable_compilation_cache() is None
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "root"))
    assert runtime.cache_root() == tmp_path / "root"
    monkeypatch.delenv(runtime.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.cache_root() == tmp_path / "xdg" / "moebius_jax"


def _pair(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    rng = np.random.default_rng(0)
    image, mask = folder / "a.jpg", folder / "m.png"
    Image.fromarray(rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)).save(image)
    hole = Image.new("L", (160, 128), 0)
    ImageDraw.Draw(hole).rectangle((40, 30, 90, 80), fill=255)
    hole.save(mask)
    return image, mask


# infer.py exactly as a user runs it, except that the paper's config (the default) is swapped
# for the tiny one the fixture weights belong to.
_RUN_INFER = """
import sys
import moebius_jax.config
moebius_jax.config.default_model_config = lambda: {config!r}
import infer
sys.exit(infer.main(sys.argv[1:]))
"""


@pytest.mark.slow  # two infer.py processes, one compiling the tiny sampler (about 65 s of CPU on 2 cores)
def test_first_run_with_no_flags_then_a_second_run_from_the_compilation_cache(tmp_path):
    """The acceptance: `infer.py --image --mask --out` fetches (from the Hub-style cache),
    converts once and compiles once; the identical second run loads every program from
    JAX's persistent cache (no compilation written, at least one read) and converts nothing."""
    hub_cache = build_hub_cache(tmp_path / "hf")
    image, mask = _pair(tmp_path)
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1",
               MOEBIUS_JAX_CACHE=str(tmp_path / "moebius"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop(runtime.COMPILE_CACHE_ENV, None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the default per-user folder under MOEBIUS_JAX_CACHE
    script = _RUN_INFER.format(config=str(TINY_CONFIG))
    reports, outputs = [], []
    for run in (1, 2):
        out = tmp_path / f"r{run}.png"
        proc = subprocess.run([sys.executable, "-c", script, "--image", str(image), "--mask", str(mask),
                               "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads(proc.stderr.strip().splitlines()[-1]))
        outputs.append(np.asarray(Image.open(out)))
        assert ("converting" in proc.stderr) == (run == 1)
    first, second = reports
    assert first["images"] == second["images"] == 1
    compile_dir = tmp_path / "moebius" / "jax"
    assert first["compile_cache"] == {"dir": str(compile_dir), "hits": 0, "writes": first["compile_cache"]["writes"]}
    assert first["compile_cache"]["writes"] >= 1 and any(compile_dir.iterdir())
    assert second["compile_cache"]["hits"] >= 1 and second["compile_cache"]["writes"] == 0
    assert second["trace_seconds"] > 0  # tracing is paid again; only XLA's work is cached
    assert np.array_equal(outputs[0], outputs[1])
