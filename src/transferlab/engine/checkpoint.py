"""The checkpoint file format, in one place: what `best.pt` holds (`Checkpoint`), how it is written and read.

A checkpoint is a plain dict of tensors and JSON-like values, read with `weights_only=True` (no pickled code).
Older formats are read through one function, `upgrade`, with the defaults they imply: format 1 (before the fields that
say how validation ran), 2 (before the resize policy and storage size), 3 (before the exact stored side). A value no
run writes (a resolution below 1, a temperature that is not a positive number) is refused in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import CheckpointError
from ..fsutil import atomic_save, read_torch_file
from ..scoring.calibration import TEMPERATURE_RANGE

CHECKPOINT_FORMAT = "transferlab-checkpoint-4"
READABLE_FORMATS = (
    "transferlab-checkpoint-1",
    "transferlab-checkpoint-2",
    "transferlab-checkpoint-3",
    CHECKPOINT_FORMAT,
)


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
    storage_size: int | None  # the largest side the run asked its images to be stored at (None: their own)
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
    # calibration: probabilities = softmax(logits / temperature), fitted on the validation split after training
    temperature: float = 1.0
    # the square's central fraction kept before resizing to `resolution`, and the resizing
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    # the side every training image was stored at, exactly: evaluate and predict store any file at this side too, so a
    # file is seen as training saw it (None: written before format 4, which stored files at most storage_size)
    stored_side: int | None = None
    # how `temperature` was chosen (scoring.calibration.Calibration.to_dict: fitted, or 1 and why); None before format 4
    calibration: dict | None = None
    # the working directory training ran in: a relative --data or --labels in `config` is relative to it (None: not
    # recorded, before it was)
    directory: str | None = None

    def save(self, path: Path) -> None:
        state = {"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}
        atomic_save(state, path, "checkpoint")

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """The checkpoint at `path`, or a one-line CheckpointError."""
        path = Path(path)
        raw = read_torch_file(path, "checkpoint", CheckpointError)
        if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS:
            raise CheckpointError(f"{path} is not a transferlab checkpoint (expected format {CHECKPOINT_FORMAT})")
        raw = upgrade(raw)
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise CheckpointError(f"{path} is not a complete transferlab checkpoint (no {missing[0]!r})")
        checkpoint = cls(**{f.name: raw[f.name] for f in fields(cls)})
        problem = checkpoint.problem()
        if problem:
            raise CheckpointError(f"{path} is damaged or not transferlab's: {problem}")
        return checkpoint

    def problem(self) -> str | None:
        """What makes this checkpoint unusable (a value no run writes), or None."""
        classes = self.classes
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            return "its classes are not a list of names"
        if len(set(classes)) < len(classes):
            return f"its classes name one class twice ({', '.join(classes)})"
        for name, low, high in (("resolution", 1, 4096), ("cut", 0, 10_000), ("stored_side", 1, 16_384),
                                ("storage_size", 1, 16_384), ("epoch", 1, 10**9)):  # fmt: skip
            value = getattr(self, name)
            if value is None and name in ("stored_side", "storage_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                return f"{name} = {value!r} (expected a whole number from {low} to {high})"
        low, high = TEMPERATURE_RANGE
        if not (_number(self.temperature) and low <= self.temperature <= high):
            return f"temperature = {self.temperature!r} (expected a number from {low} to {high}, the fit's range)"
        if not (_number(self.crop_fraction) and 0 < self.crop_fraction <= 1):
            return f"crop_fraction = {self.crop_fraction!r} (expected a number in (0, 1])"
        if not (_number(self.dropout) and 0 <= self.dropout < 1):
            return f"dropout = {self.dropout!r} (expected a number in [0, 1))"
        if not (_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            return f"label_smoothing = {self.label_smoothing!r} (expected a number in [0, 1))"
        vectors = (self.mean, self.std)
        if not all(isinstance(v, list | tuple) and len(v) == 3 and all(_number(x) for x in v) for v in vectors):
            return f"mean {self.mean!r} / std {self.std!r} (expected 3 finite numbers each)"
        if not all(s > 0 for s in self.std):
            return f"std {self.std!r} (expected values > 0)"
        for name in ("autocast", "tta_flip"):
            if not isinstance(getattr(self, name), bool):
                return f"{name} = {getattr(self, name)!r} (expected true or false)"
        for name, allowed in (("interpolation", ("bilinear", "bicubic")), ("resize_policy", ("crop", "squash", "pad")),
                              ("loss", ("ce", "mse")), ("feature_dtype", (None, *FEATURE_DTYPES))):  # fmt: skip
            if getattr(self, name) not in allowed:
                return f"{name} = {getattr(self, name)!r} (expected one of {', '.join(map(str, allowed))})"
        return None


FEATURE_DTYPES = ("float16", "bfloat16", "float32")  # what a cached prefix output is stored as


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def upgrade(raw: dict) -> dict:
    """A checkpoint of any readable format as the current format's fields, with what older formats implied."""
    if raw["format"] == "transferlab-checkpoint-1":  # validation then: the whole network in fp32, no autocast
        config = raw.get("config", {})
        raw = {"cut": 0, "feature_dtype": None, "autocast": False, "metric": "val_accuracy", "val_loss": float("nan"),
               "data": None, "label_smoothing": config.get("label_smoothing", 0.0), **raw}  # fmt: skip
    if raw["format"] in ("transferlab-checkpoint-1", "transferlab-checkpoint-2"):  # a centre square at its own size
        raw = {"resize_policy": "crop", "storage_size": None, **raw}
    # optional before format 4: no temperature scaling, the whole square at bilinear, the side not recorded
    return {"temperature": 1.0, "crop_fraction": 1.0, "interpolation": "bilinear", "stored_side": None,
            "calibration": None, **raw}  # fmt: skip
