"""Which transferlab made a result: the package version and, from a git checkout, the commit."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("transferlab")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.1.0"


def git_commit() -> str | None:
    """The commit of the checkout holding this package, or None (an installed wheel, no git, not a repository)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def build_info() -> dict:
    info = {"version": __version__}
    commit = git_commit()
    if commit:
        info["commit"] = commit
    return info
