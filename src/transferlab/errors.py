"""Errors a user sees as one line, and the helper that makes any exception's message one line.

Every error class here (and ConfigError, DataError, WeightsError, CheckpointError, StudyError elsewhere) carries a
message of one line naming the cause; the CLI prints it after "transferlab: error:" with no traceback.
"""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (database drivers add context lines below it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class OutputError(RuntimeError):
    """A result could not be written (a full disk, a vanished folder); nothing half-written is left behind."""
