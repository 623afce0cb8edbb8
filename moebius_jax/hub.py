"""Weights from the Hugging Face Hub, converted once into a local cache.

A spec that is not a local path and looks like `org/repo[/path/in/repo]` is fetched with
huggingface_hub (the optional `hub` extra): a path with a file suffix downloads that file, a
folder path (or none) downloads that folder. UNet weights are then converted once into an
orbax directory under the cache, so later runs skip the torch-format parsing.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re

_REPO_SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<path>.+))?$")
DEFAULT_CACHE = pathlib.Path(os.environ.get("MOEBIUS_JAX_CACHE", "~/.cache/moebius_jax")).expanduser()


def resolve(spec: str | os.PathLike) -> pathlib.Path:
    """A local path as is; otherwise download `org/repo[/path]` from the Hub."""
    path = pathlib.Path(spec).expanduser()
    if path.exists():
        return path
    match = _REPO_SPEC.match(os.fspath(spec))
    if match is None or os.fspath(spec).startswith((".", "/", "~")):
        raise FileNotFoundError(f"weights not found: {spec} (neither a local path nor org/repo[/path])")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{spec} is not a local path; to fetch it from the Hugging Face Hub install the hub "
            "extra: pip install 'moebius-jax[hub]'") from None
    repo, sub = match.group("repo"), match.group("path")
    if sub and pathlib.PurePosixPath(sub).suffix:
        return pathlib.Path(hf_hub_download(repo, sub))
    root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    return pathlib.Path(root) / (sub or "")


def converted_cache_dir(weights: pathlib.Path, cache: pathlib.Path = DEFAULT_CACHE) -> pathlib.Path:
    """Where a converted copy of `weights` lives: keyed by its absolute path, size and mtime."""
    stat = weights.stat()
    digest = hashlib.sha256(f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache / "converted" / f"{weights.stem}-{digest}"
