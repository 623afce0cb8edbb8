"""Errors raised while reading or mapping checkpoints.

Every error names the file it came from; a key mismatch lists every offending key at once,
so a user fixes a bad checkpoint in one round instead of one key at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from moebius_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint file cannot be read or does not fit the model."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the whitelist; nothing was executed."""


class CheckpointMismatchError(CheckpointError):
    """Keys or shapes of a checkpoint do not match the model they are loaded into."""

    def __init__(
        self,
        source: str,
        missing: Sequence[tuple[str, tuple[int, ...]]] = (),
        unexpected: Sequence[tuple[str, tuple[int, ...]]] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ):
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"{source}: checkpoint does not match the model"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s) (expected shape):")
            lines += [f"    {k}  expected {tuple(s)}" for k, s in self.missing]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) (actual shape):")
            lines += [f"    {k}  actual {tuple(s)}" for k, s in self.unexpected]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} shape mismatch(es):")
            lines += [
                f"    {k}  expected {tuple(e)}, actual {tuple(a)}" for k, e, a in self.mismatched
            ]
        super().__init__("\n".join(lines))
