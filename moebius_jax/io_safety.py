"""Where outputs may go: checked before any work starts, written so a crash leaves no half file.

Commands check their output paths first (cheaply, before a model loads) and refuse, naming the
path, what they would otherwise lose or fail on late: an output that is a folder, a folder that
is a file, a parent that cannot be created, an input that would be overwritten, a folder that
holds something the command did not write. Files are written through :func:`atomic_output`
(a temporary sibling renamed over the target once complete).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import secrets
from collections.abc import Collection, Iterable, Iterator, Set as AbstractSet

from moebius_jax.errors import UserError

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block completes."""
    target = pathlib.Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def check_creatable(path: PathLike, what: str) -> None:
    """Refuse a path whose missing parent folders cannot be made: the nearest existing ancestor
    must be a writable folder."""
    path = pathlib.Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path}: cannot create it, {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot create it, the folder {ancestor} is not writable")


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
    return path == folder or folder in path.parents


def check_output_file(path: PathLike, what: str, inputs: AbstractSet[pathlib.Path] = frozenset()) -> pathlib.Path:
    """``path`` as a file to (over)write: not a folder, its folder creatable, not one of ``inputs``
    (resolved paths, e.g. ``{p.resolve() for p in sources}``)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    check_creatable(path, what)
    if path.resolve() in inputs:
        raise UserError(f"{what} {path} is also an input; refusing to overwrite it")
    return path


def image_format(path: PathLike, what: str) -> str:
    """The Pillow format that ``path``'s suffix names, refused unless Pillow can write an RGB
    image in it (tried in memory, so the check is exact and happens before any work)."""
    from PIL import Image

    suffix = pathlib.Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is not None and fmt in Image.SAVE:
        try:
            Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
            return fmt
        except (OSError, ValueError, KeyError):
            pass
    raise UserError(f"{what} {path}: cannot write an RGB image with the suffix {suffix or '(none)'!r}; "
                    "use .png, .jpg, .webp, .bmp or .tif")


def prepare_output_dir(path: PathLike, what: str, *, marker: str, writes: Collection[str] = (),
                       inputs: Iterable[PathLike] = (), overwrite: bool = False,
                       flag: str = "--overwrite") -> pathlib.Path:
    """Check that a command may write into folder ``path``: it is new, empty, or an earlier output
    of the same command (it holds ``marker``), and then only with ``overwrite``. Anything else is
    refused naming what is in the way, as is an input at one of the names the command writes
    there (``writes``, with ``marker``). Creates nothing.

    A resumable command passes ``overwrite=True``: its earlier output is what it continues."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    if not path.exists():
        check_creatable(path, what)
        return path
    written = [(path / name).resolve() for name in {marker, *writes}]
    for source in inputs:
        if any(_inside(pathlib.Path(source).resolve(), target) for target in written):
            raise UserError(f"{what} {path}: the input {source} is where this command writes its output; "
                            "choose another folder")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    if (path / marker).exists():
        if overwrite:
            return path
        raise UserError(f"{what} {path} holds an earlier output ({marker}); pass {flag} to replace it, "
                        "or choose another folder")
    listed = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise UserError(f"{what} {path} is not empty ({listed}) and holds no earlier output of this command "
                    f"({marker}); choose a new or empty folder")
