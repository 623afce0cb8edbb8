"""The errors a user can cause, as opposed to bugs.

Every command-line entry point turns a :class:`UserError` (and the operating system's "bad
path" errors) into a one-line message without a traceback (`moebius_jax.cli`); any other
exception is a bug and keeps its traceback. The specific errors of each part (checkpoints,
images, data sources, benchmarks, configs, ...) derive from :class:`UserError`. It is a
``ValueError``, so code that caught ``ValueError`` before still catches them.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import yaml

Field = Sequence[str | int]  # a path of mapping keys and list indices into a config, e.g. ("model", "levels", 1)


class UserError(ValueError):
    """A bad argument, path, config or data file; the message names it and says what is wrong."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the pip extra to install."""


class ConfigError(UserError):
    """A config file cannot be parsed, or one of its fields holds a value that does not fit.

    ``field`` is where the value sits; with ``file`` set the message also gives the line it is
    written on (``configs/x.yaml:12: model.block_out_channels[1]: expected an integer, got '64'``).
    """

    def __init__(self, message: str, *, field: Field | None = None, file: str | os.PathLike | None = None):
        self.message, self.field, self.file = message, None if field is None else tuple(field), file
        where = "" if self.field is None else f"{dotted(self.field)}: "
        if file is not None:
            line = field_line(file, self.field) if self.field is not None else None
            where = f"{os.fspath(file)}{'' if line is None else f':{line}'}: {where}"
        super().__init__(where + message)

    def in_file(self, file: str | os.PathLike) -> ConfigError:
        """The same error, located in ``file`` (the message gains the file and the line)."""
        return ConfigError(self.message, field=self.field, file=file)


def dotted(field: Field) -> str:
    """``("model", "levels", 1, "channels")`` -> ``model.levels[1].channels``."""
    text = ""
    for part in field:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def read_yaml(path: str | os.PathLike) -> object:
    """Parse a YAML file. Invalid YAML raises ConfigError with the file, line, column and the key
    it was reading; a missing file raises FileNotFoundError naming it."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        # The key whose value was being read: the opening mark of the unclosed construct if any.
        start = err.context_mark or err.problem_mark
        key = _key_above(text, start.line) if start is not None else None
        context = f"{err.context}, " if err.context else ""
        raise ConfigError(f"{where}: invalid YAML ({context}{err.problem})"
                          + (f" in the value of `{key}`" if key else "")) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None


def _key_above(text: str, line: int) -> str | None:
    """The nearest mapping key written on or above ``line`` (0-based)."""
    for row in reversed(text.splitlines()[:line + 1]):
        head = row.strip().lstrip("-").strip()
        if ":" in head and not head.startswith("#"):
            key = head.split(":", 1)[0].strip()
            if key and " " not in key:
                return key
    return None


def field_line(path: str | os.PathLike, field: Field) -> int | None:
    """The 1-based line where ``field`` is written in the YAML file, or None if it is not there
    (or the file cannot be read): the deepest part of the path that exists is taken."""
    try:
        node = yaml.compose(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in field:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
