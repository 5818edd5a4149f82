"""Every error a user sees, as one line, and the helpers that make any exception's message one line.

Each class carries a message of one line naming the cause and the exit status the CLI gives it: 2 for input that
cannot work (a usage error: a bad option, file, checkpoint or storage), 1 for work that failed on the way (a run that
diverged, a full disk, lost partner processes). The CLI prints "transferlab: error: <message>", no traceback.
"""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (database drivers add context lines below it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class TransferlabError(Exception):
    """A failure the user sees as one line; `exit_code` is what the command line returns for it."""

    exit_code = 2


class ConfigError(TransferlabError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(TransferlabError, RuntimeError):
    """Input data is missing or unreadable (the message names the file or folder)."""


class WeightsError(TransferlabError, RuntimeError):
    """Pretrained weights are missing or do not fit the architecture. Its advice names the fix where the user is:
    `train`'s --weights flag, or (for_study) a study spec's weights key."""

    FIXES = {
        "train": {"path": "--weights PATH", "none": "--weights none", "any": "--weights imagenet|none|PATH"},
        "study": {
            "path": '--set weights=PATH (or weights = "PATH" in [run])',
            "none": "--set weights=none",
            "any": "--set weights=imagenet|none|PATH (or weights = ... in [run])",
        },  # fmt: skip
    }

    def __init__(self, problem: str, advice: str = "", where: str = "train"):
        self.problem, self.advice = problem, advice
        text = advice.format(**self.FIXES[where]) if advice else ""
        super().__init__(f"{problem}: {text}" if text else problem)

    def for_study(self) -> WeightsError:
        """The same error with the fix a study takes (its spec has no --weights flag)."""
        return WeightsError(self.problem, self.advice, "study")


class CheckpointError(TransferlabError, RuntimeError):
    """A checkpoint is missing, damaged or not one of ours."""


class StudyError(TransferlabError, RuntimeError):
    """A study cannot be run or reported as asked."""


class RunFolderError(ConfigError):
    """--out holds another run's results, or another process is training there."""


class RunBusyError(RunFolderError):
    """Another process is training in the run folder now."""


class TrainingError(TransferlabError, RuntimeError):
    """A run cannot go on (its loss is no longer finite)."""

    exit_code = 1


class OutputError(TransferlabError, RuntimeError):
    """A result could not be written (a full disk, a vanished folder); nothing half-written is left behind."""

    exit_code = 1


class DistributedError(TransferlabError, RuntimeError):
    """A process lost the others (one died, or a collective timed out). Every process says so itself."""

    exit_code = 1
