"""Process-wide JAX settings shared by the entry points (infer.py, train.py, eval, the pipeline).

`cache_root()` is the per-user folder for everything moebius-jax caches (converted weights,
compiled programs); `enable_compilation_cache()` turns on JAX's persistent compilation cache
there, so a second identical run loads its compiled programs from disk instead of recompiling.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

log = logging.getLogger(__name__)

CACHE_ENV = "MOEBIUS_JAX_CACHE"  # root of every moebius-jax cache
COMPILE_CACHE_ENV = "MOEBIUS_JAX_COMPILE_CACHE"  # a folder for compiled programs, or "off"
OFF = ("off", "0", "false", "no", "none")


def cache_root() -> pathlib.Path:
    """$MOEBIUS_JAX_CACHE, else $XDG_CACHE_HOME/moebius_jax, else ~/.cache/moebius_jax."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(base).expanduser() / "moebius_jax"


@dataclasses.dataclass
class CompileCacheStats:
    """What the persistent cache did in this process (from JAX's monitoring events)."""

    directory: pathlib.Path | None = None
    hits: int = 0  # programs loaded from the cache instead of compiled
    writes: int = 0  # programs compiled and stored (JAX skips ones that compile very fast)

    def as_dict(self) -> dict[str, object]:
        return {"dir": str(self.directory) if self.directory else None, "hits": self.hits, "writes": self.writes}


COMPILE_CACHE = CompileCacheStats()
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}


def _count(event: str, **_: object) -> None:
    field = _EVENTS.get(event)
    if field is not None:
        setattr(COMPILE_CACHE, field, getattr(COMPILE_CACHE, field) + 1)


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache; returns its folder, or None when off.

    The folder is `directory`, else $MOEBIUS_JAX_COMPILE_CACHE, else JAX's own
    `jax_compilation_cache_dir` (e.g. $JAX_COMPILATION_CACHE_DIR) when already set, else
    `cache_root()/jax`. The value "off" (argument or variable) leaves the cache off. Which
    programs are worth storing is JAX's choice (`jax_persistent_cache_min_compile_time_secs`,
    1 s by default). Call it before the first compilation: JAX opens the cache once per process.
    Hits and writes are counted in `COMPILE_CACHE`.
    """
    import jax  # here, not at the top: importing this module must not start JAX

    choice = os.fspath(directory) if directory is not None else os.environ.get(COMPILE_CACHE_ENV, "")
    if choice.strip().lower() in OFF:
        return None
    configured = jax.config.jax_compilation_cache_dir
    path = pathlib.Path(choice or configured or cache_root() / "jax").expanduser().absolute()
    if configured != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
    if COMPILE_CACHE.directory is None:
        jax.monitoring.register_event_listener(_count)
    COMPILE_CACHE.directory = path
    log.debug("persistent compilation cache: %s", path)
    return path
