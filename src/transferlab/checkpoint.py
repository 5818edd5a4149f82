"""The checkpoint file format, in one place: what `best.pt` holds (`Checkpoint`), how it is written and read.

A checkpoint is a plain dict of tensors and JSON-like values, read with `weights_only=True` (no pickled code).
Format 1 (before the fields that say how validation ran) and format 2 (before the resize policy and storage size)
are still read, with the defaults they imply; `temperature` is optional in every format (1.0, no scaling, when absent).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "transferlab-checkpoint-3"
READABLE_FORMATS = ("transferlab-checkpoint-1", "transferlab-checkpoint-2", CHECKPOINT_FORMAT)


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


@dataclass
class Checkpoint:
    # how to rebuild the model
    arch: str
    head: str
    dropout: float
    classes: list[str]
    model: dict  # the state dict
    # how a file becomes a stored uint8 square (data.decode_image), and that square the model's input
    resize_policy: str
    storage_size: int | None  # None: the image's own square side
    resolution: int
    mean: list[float]
    std: list[float]
    # how validation ran, so evaluation repeats it: frozen groups, dtype of their cached output, bf16 autocast
    cut: int
    feature_dtype: str | None
    autocast: bool
    # how it was scored
    loss: str
    label_smoothing: float
    tta_flip: bool
    # which epoch it is, and why it was chosen
    epoch: int
    metric: str
    val_accuracy: float
    val_loss: float
    # provenance
    config: dict
    weights: str
    data: str | None  # the decoded data's fingerprint (ImageSet.key)
    environment: dict
    # calibration: probabilities = softmax(logits / temperature), fitted on the validation split after training;
    # optional in every format (1.0 when absent), so the format number is unchanged
    temperature: float = 1.0
    # the square's central fraction kept before resizing to `resolution`, and the resizing; optional likewise (what
    # every checkpoint written before them used)
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"

    def save(self, path: Path) -> None:
        atomic_save({"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}, path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """The checkpoint at `path`, or a one-line CheckpointError."""
        path = Path(path)
        raw = read_torch_file(path, "checkpoint", CheckpointError)
        if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS:
            raise CheckpointError(f"{path} is not a transferlab checkpoint (expected format {CHECKPOINT_FORMAT})")
        if raw["format"] == "transferlab-checkpoint-1":  # validation then: the whole network in fp32, no autocast
            config = raw.get("config", {})
            raw = {
                "cut": 0,
                "feature_dtype": None,
                "autocast": False,
                "metric": "val_accuracy",
                "val_loss": float("nan"),
                "data": None,
                "label_smoothing": config.get("label_smoothing", 0.0),
                **raw,
            }
        if raw["format"] != CHECKPOINT_FORMAT:  # before format 3: a centre square at the image's own size
            raw = {"resize_policy": "crop", "storage_size": None, **raw}
        raw = {"temperature": 1.0, "crop_fraction": 1.0, "interpolation": "bilinear", **raw}
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise CheckpointError(f"{path} is not a complete transferlab checkpoint (no {missing[0]!r})")
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


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
