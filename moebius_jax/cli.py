"""What every command-line entry point shares: the error boundary, the parser, checked argument types.

The boundary (:func:`entry_point`) turns the errors a user can cause into ``error: <message>``
on stderr and exit status 1, without a traceback: :class:`moebius_jax.errors.UserError` (bad
arguments, configs, checkpoints, images, data) and the operating system's errors about a path
(missing, a folder where a file is needed, no permission, disk full). Anything else is a bug
and propagates with its traceback. ``--debug`` (or ``MOEBIUS_JAX_DEBUG=1``) shows the
traceback of every error. Range checks happen while parsing (argparse's own error, exit 2),
before anything expensive runs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from moebius_jax.errors import UserError

DEBUG_ENV = "MOEBIUS_JAX_DEBUG"
# Operating-system errors that describe a path the user gave (or the disk it is on), not a bug.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

F = TypeVar("F", bound=Callable[..., Any])


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the module docstring kept as written and the shared ``--debug`` flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")


def debug_requested(argv: list[str] | None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "--debug" in options or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (reported in a line) rather than a bug (traceback)."""
    if isinstance(err, (UserError, *PATH_ERRORS)):
        return True
    return isinstance(err, OSError) and err.errno in _DISK_ERRNOS


def message(err: BaseException) -> str:
    """The one-line (or few-line) text of a user error; OS errors read ``path: reason``."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        where = os.fspath(err.filename)
        if err.filename2 is not None:
            where += f" -> {os.fspath(err.filename2)}"
        return f"{where}: {err.strerror}"
    return str(err)


def entry_point(main: F) -> F:
    """Decorate a command's ``main(argv=None)``: user errors become ``error: ...`` on stderr and
    return 1, Ctrl-C returns 130; bugs and ``--debug`` keep the traceback."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> Any:
        debug = debug_requested(argv)
        try:
            return main(argv)
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            if debug or not is_user_error(err):
                raise
            print(f"error: {message(err)}", file=sys.stderr)
            return 1

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def user_inputs() -> Iterator[None]:
    """Inside this block every ValueError is about the files the user named (model, VAE and
    config loading, whose messages name the file): it is reported like a UserError."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from err


# --------------------------------------------------------------------------------------------
# argparse types: a bad value is argparse's own error ("argument --steps: must be >= 1, got 0").


def number(kind: type = float, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=`` for a finite ``kind`` (int or float) in [low, high] (or (low, high]
    with ``low_open``); NaN and infinity are always refused."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


positive_int = number(int, low=1)
non_negative_int = number(int, low=0)
finite_float = number(float)
non_negative_float = number(float, low=0)
fraction = number(float, low=0, high=1, low_open=True)  # in (0, 1]


def model_resolution(text: str) -> int:
    """argparse type of a side the model runs at: an integer of at least the pipeline's minimum."""
    from moebius_jax.pipeline.preprocess import MIN_SIDE  # imports JAX, so only when the flag is given

    return number(int, low=MIN_SIDE)(text)
