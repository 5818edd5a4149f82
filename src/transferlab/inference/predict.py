"""Checkpoints in use: load one (its network's forward path, engine/forward.py), store a file as its run stored its
images, predict files. Evaluating labelled images: evaluate.py."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.decode import IMAGE_EXTENSIONS, decode_image
from ..data.sources import image_entries
from ..engine.checkpoint import Checkpoint
from ..engine.device import resolve_device
from ..engine.forward import Forward
from ..engine.preprocess import Preprocess
from ..engine.rundir import checkpoint_file
from ..errors import CheckpointError, ConfigError, DataError, first_line
from ..models.registry import get_backbone
from ..models.weights import build_model
from ..progress import track
from ..scoring.metrics import TIE_TOLERANCE


# ------------------------------------------------------------------------------ checkpoints in use
@dataclass
class LoadedModel(Forward):
    """A checkpoint ready to use: its network's forward path (engine.forward.Forward) and what it was trained on."""

    model: nn.Module = None
    classes: list[str] = None
    loss: str = "ce"
    label_smoothing: float = 0.0
    info: dict = None
    calibration: dict | None = None  # how the temperature was chosen (Calibration.to_dict); None: not recorded


def load_checkpoint(path: str | Path, device: str = "auto") -> LoadedModel:
    """The checkpoint at `path` (a best.pt, or the run folder holding it) on `device`, ready to use."""
    path = checkpoint_file(path)
    return loaded_model(Checkpoint.load(path), path, device)


def loaded_model(ckpt: Checkpoint, path: str | Path, device: str = "auto") -> LoadedModel:
    """The network of a loaded checkpoint (read from `path`, named in errors) on `device`, ready to use."""
    dev = resolve_device(device)
    model, _ = build_model(ckpt.arch, len(ckpt.classes), weights="none", head=ckpt.head, dropout=ckpt.dropout)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit {ckpt.arch}: {first_line(error)}") from None
    model.to(dev, memory_format=torch.channels_last).eval()
    backbone = get_backbone(ckpt.arch)
    prefix, suffix = backbone.split(model, ckpt.cut)
    info = {k: getattr(ckpt, k) for k in ("arch", "epoch", "metric", "val_accuracy", "val_loss", "resolution",
                                          "weights", "config", "data", "resize_policy", "storage_size",
                                          "stored_side", "crop_fraction", "interpolation", "directory")}  # fmt: skip
    return LoadedModel(
        model=model,
        prefix=prefix,
        suffix=suffix,
        preprocess=Preprocess(
            tuple(ckpt.mean),
            tuple(ckpt.std),
            ckpt.resolution,
            channels_last=True,
            crop_fraction=ckpt.crop_fraction,
            interpolation=ckpt.interpolation,
        ),  # fmt: skip
        classes=ckpt.classes,
        loss=ckpt.loss,
        label_smoothing=ckpt.label_smoothing,
        tta_flip=ckpt.tta_flip,
        autocast=ckpt.autocast,
        feature_dtype=getattr(torch, ckpt.feature_dtype) if ckpt.feature_dtype else None,
        device=dev,
        info=info,
        temperature=ckpt.temperature,
        calibration=ckpt.calibration,
    )


def decode_as_trained(loaded: LoadedModel, path: str | Path) -> np.ndarray:
    """One file stored exactly as the checkpoint's run stored its images (see stored_as_trained)."""
    side = loaded.info.get("stored_side")
    if side is not None:
        return decode_image(Path(path), side, loaded.info["resize_policy"])
    return decode_image(Path(path), loaded.info["storage_size"], loaded.info["resize_policy"], upscale=False)


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[dict]]:
    """predict's arguments -> (image files, each once, in argument order; one {"file", "error"} per argument that
    names nothing). A file is taken as given. A folder gives its images at any depth, read as data folders are
    (image extensions only, hidden names skipped). An argument with * ? [ that is not itself a path is a pattern
    (glob, ** recursive; the shell usually expands them, but not quoted or on Windows): its folders and image files."""
    paths: dict[str, None] = {}  # ordered set
    errors: list[dict] = []
    for arg in inputs:
        if os.path.lexists(arg):
            chosen = [arg]
        elif any(c in arg for c in "*?["):
            chosen = [m for m in sorted(glob.glob(arg, recursive=True)) if _is_image_or_folder(m)]
            if not chosen:
                errors.append({"file": arg, "error": f"no image file or folder matches {arg}"})
        else:
            errors.append({"file": arg, "error": f"{arg} does not exist"})
            chosen = []
        for path in chosen:
            if not os.path.isdir(path):
                paths[path] = None
                continue
            try:
                entries = image_entries(Path(path))
            except DataError as error:
                errors.append({"file": path, "error": str(error)})
                continue
            if not entries:
                errors.append({"file": path, "error": f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})"})
            paths.update((entry.path, None) for entry in entries)
    return list(paths), errors


def _is_image_or_folder(path: str) -> bool:
    return os.path.isdir(path) or path.lower().endswith(IMAGE_EXTENSIONS)


PREDICT_BATCH_BYTES = 64 * 2**20  # decoded pixels held at once: batches stay small even for camera photos

PREDICT_BATCH_FILES = 256


def predict_files(
    checkpoint: str | Path, files: list[str | Path], *, top: int = 3, device: str = "auto", progress: bool = False
) -> list[dict]:
    """Top classes per file, in order; a file that cannot be read gets {"file", "error"} and the others are still
    predicted. Files are decoded a batch at a time and images of one decoded shape go through the model together."""
    if top < 1:
        raise ConfigError(f"--top {top}: expected a positive number of classes")
    loaded = load_checkpoint(checkpoint, device)
    k = min(top, len(loaded.classes))
    results: list[dict] = [{} for _ in files]

    def predict(pending: list[tuple[int, np.ndarray]]) -> None:
        shapes: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        for item in pending:
            shapes.setdefault(item[1].shape, []).append(item)
        for group in shapes.values():
            probs = loaded.probabilities(np.stack([image for _, image in group]))
            values, order = probs.topk(k)
            # the classes no less likely than the top one, as far as float32 can tell: more than one is a tie
            tied = probs >= values[:, :1] - TIE_TOLERANCE
            for (i, _), vs, js, ties in zip(group, values.tolist(), order.tolist(), tied):
                top_k = [{"class": loaded.classes[j], "probability": v} for v, j in zip(vs, js)]
                results[i] = {"file": str(files[i]), "top": top_k}
                if int(ties.sum()) > 1:
                    results[i]["tie"] = [loaded.classes[j] for j in ties.nonzero().flatten().tolist()]

    pending: list[tuple[int, np.ndarray]] = []
    held = 0
    for i, path in track(enumerate(files), total=len(files), description="predicting", enabled=progress):
        try:
            image = decode_as_trained(loaded, path)
        except DataError as error:
            results[i] = {"file": str(path), "error": str(error)}
            continue
        pending.append((i, image))
        held += image.nbytes
        if held >= PREDICT_BATCH_BYTES or len(pending) >= PREDICT_BATCH_FILES:
            predict(pending)
            pending, held = [], 0
    predict(pending)
    return results
