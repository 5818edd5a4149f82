"""The checkpoint file format, in one place: what `best.pt` holds, how it is written and read.

A checkpoint is a plain dict of tensors and JSON-like values, loaded with `weights_only=True` (no pickled code):
  format       CHECKPOINT_FORMAT
  arch, head, dropout, classes           how to rebuild the model
  resolution, mean, std                  how a uint8 image becomes its input
  cut, feature_dtype, autocast           how validation ran: frozen groups, dtype of their cached output, bf16
  loss, label_smoothing, tta_flip        how it was scored
  model                                  the state dict
  epoch, metric, val_accuracy, val_loss  which epoch it is and why it was chosen
  config, weights, data, environment     provenance
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "transferlab-checkpoint-2"
READABLE_FORMATS = ("transferlab-checkpoint-1", CHECKPOINT_FORMAT)


class CheckpointError(RuntimeError):
    """A checkpoint is missing or not one of ours (message is one line)."""


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_torch_file(path: Path, what: str, error: type[Exception]) -> object:
    """torch.load(weights_only=True) with one-line errors: a missing, empty, foreign or truncated file is named
    as such (never PyTorch's advice to drop weights_only, which would run code from the file)."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise error(f"{what} {path} is empty (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip, or a pickle in the legacy format
        raise error(f"cannot read {what} {path}: not a file written by torch.save")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a foreign pickle protocol: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign pickles: one message each
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects besides tensors, which are not loaded for safety"
        elif head == b"PK\x03\x04":
            reason = "the PyTorch file is truncated or damaged"
        else:
            reason = "not a file written by torch.save"
        raise error(f"cannot read {what} {path}: {reason}") from None


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, or a one-line CheckpointError."""
    path = Path(path)
    ckpt = read_torch_file(path, "checkpoint", CheckpointError)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a transferlab checkpoint (expected format {CHECKPOINT_FORMAT})")
    return ckpt


def writable_folder(path: str | Path, what: str, error: type[Exception]) -> Path:
    """Create `path` if needed and check that files can be written in it, before any work depends on it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise error(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise error(f"{what} {path} is not writable ({exc.strerror or type(exc).__name__})") from None
    return path
