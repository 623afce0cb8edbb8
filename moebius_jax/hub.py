"""Weights from the Hugging Face Hub, converted once into a local cache.

A weight argument that is not an existing local path and reads `org/repo[/path/in/repo]` is a
Hub id: a path with a file suffix names a file, anything else a folder. Files are fetched with
huggingface_hub into its own cache ($HF_HUB_CACHE, ~/.cache/huggingface/hub by default; it
honours HF_HUB_OFFLINE=1 and HF_TOKEN), and the loaders then convert them once into orbax
copies under `cache_root()/converted`, which later runs read directly.

With no weights given, the released models are used: the student from `hustvl/Moebius`
(`VARIANTS`: the pretrained model and three fine-tunes) and the VAE from `hustvl/PixelHacker`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moebius_jax.runtime import cache_root

log = logging.getLogger(__name__)

STUDENT_REPO = "hustvl/Moebius"
VARIANTS = ("pretrained", "ft_places2", "ft_celebahq", "ft_ffhq")
STUDENT_FILE = "diffusion_pytorch_model.bin"
DEFAULT_VAE = "hustvl/PixelHacker/vae"
# A diffusers folder's weights, in diffusers' lookup order.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<path>.+?))?/?$")


class HubError(FileNotFoundError):
    """Weights could not be found locally nor fetched from the Hub; the message says what was
    tried, where the cache is and how to pass local files instead."""


def student_weights(variant: str = "pretrained") -> str:
    """The Hub id of a released student: `hustvl/Moebius/<variant>/diffusion_pytorch_model.bin`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    return f"{STUDENT_REPO}/{variant}/{STUDENT_FILE}"


def student_choice(weights: str | os.PathLike | None, variant: str | None) -> str | os.PathLike:
    """`weights` if given, else the released `variant` (default "pretrained"); not both."""
    if weights is not None and variant is not None:
        raise ValueError(f"variant {variant!r} picks released weights; it cannot be combined with weights {weights}")
    return student_weights(variant or "pretrained") if weights is None else weights


def is_hub_id(spec: str | os.PathLike) -> bool:
    """Whether `spec` names Hub weights: not an existing local path, and `org/repo[/path]`."""
    text = os.fspath(spec)
    if pathlib.Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return False
    return _HUB_ID.match(text) is not None


def canonical(spec: str | os.PathLike) -> str:
    """A stable name for weights: a Hub id as it is, a local path made absolute."""
    return os.fspath(spec) if is_hub_id(spec) else str(pathlib.Path(spec).expanduser().resolve())


def hub_cache_dir() -> pathlib.Path:
    """Where huggingface_hub keeps downloads (honours HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return pathlib.Path(constants.HF_HUB_CACHE)


def fetch(spec: str, candidates: Sequence[str] = ()) -> pathlib.Path:
    """Download Hub file `spec`, or for a folder id the first of `candidates` (file names) it
    holds; returns the local file in huggingface_hub's cache (no network if it is there)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    match = _HUB_ID.match(spec)
    if match is None:
        raise HubError(f"{spec!r} is not a Hugging Face id org/repo[/path]")
    repo, sub = match.group("repo"), match.group("path") or ""
    if pathlib.PurePosixPath(sub).suffix or not candidates:
        names = [sub]
    else:
        names = [f"{sub}/{name}" if sub else name for name in candidates]
    errors = []
    for name in names:
        try:
            return pathlib.Path(hf_hub_download(repo, name))
        except EntryNotFoundError as e:  # offline and not cached, or not in the repository
            errors.append(f"{name}: {_first_line(e)}")
        except (RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            errors.append(f"{name}: {_first_line(e)}")
            break  # no access to the repository at all: the other names cannot do better
    tried = ", ".join(f"{repo}/{name}" for name in names)
    raise HubError(
        f"{spec} is not a local path, and fetching it from the Hugging Face Hub failed "
        f"(tried {tried}: {'; '.join(errors)}). The Hub cache is {hub_cache_dir()} "
        "(set HF_HUB_CACHE to use another; HF_TOKEN for gated repositories). Offline, pass local "
        "files instead: infer.py --weights FILE.bin --vae VAE_FOLDER (in Python, the same paths "
        "as the weights arguments), or copy a cache holding them from a machine with network access.")


def converted_cache_dir(sources: Sequence[pathlib.Path], kind: str) -> pathlib.Path:
    """Where the converted copy of `sources` lives: keyed by their real paths, sizes and mtimes
    (a Hub file's real path is its content-addressed blob)."""
    stamp = "|".join(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in sources)
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{kind}-{digest}"


def converted_variables(sources: Sequence[pathlib.Path], kind: str, read: Callable[[], Mapping[str, Any]],
                        abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Variables from the orbax copy of `sources`, made by `read()` the first time.

    The copy is written to a temporary folder and renamed into place, so an interrupted
    conversion is never picked up; concurrent first runs may both convert, one wins.
    """
    from moebius_jax.convert.orbax_io import is_orbax_dir, restore_variables, save_variables

    target = converted_cache_dir(sources, kind)
    if not is_orbax_dir(target):
        log.info("converting %s once into %s", ", ".join(str(p) for p in sources), target)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        save_variables(partial, read())
        try:
            partial.rename(target)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(partial, ignore_errors=True)
            if not is_orbax_dir(target):
                raise
    return restore_variables(target, abstract)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
