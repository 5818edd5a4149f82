"""Checkpoints in use: evaluate on a data set (accuracy, loss, per-class accuracy, confusion
matrix) and predict the classes of image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import Preprocess
from .data import DataError, ImageSet, decode_image
from .models import build_model
from .train import CHECKPOINT_FORMAT, resolve_device


class CheckpointError(RuntimeError):
    """A checkpoint is missing or not one of ours (message is one line)."""


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    loss: str
    tta_flip: bool
    device: torch.device
    info: dict

    @torch.no_grad()
    def probabilities(
        self, images: np.ndarray | torch.Tensor, batch_size: int = 500, tta_flip: bool | None = None
    ) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (N, K) class probabilities (on the CPU)."""
        tta = self.tta_flip if tta_flip is None else tta_flip
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # Pillow's arrays are read-only; torch warns about those
        images = torch.as_tensor(images)
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                p = self.model(self.preprocess(batch)).float().softmax(1)
                if tta:
                    p = (p + self.model(self.preprocess(batch, mirror=True)).float().softmax(1)) / 2
            out.append(p.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))


def load_checkpoint(path: str | Path, device: str = "auto") -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a transferlab checkpoint (expected format {CHECKPOINT_FORMAT})")
    dev = resolve_device(device)
    model, _ = build_model(
        ckpt["arch"], len(ckpt["classes"]), weights="none", head=ckpt["head"], dropout=ckpt["dropout"]
    )
    model.load_state_dict(ckpt["model"])
    model.to(dev, memory_format=torch.channels_last).eval()
    preprocess = Preprocess(tuple(ckpt["mean"]), tuple(ckpt["std"]), ckpt["resolution"], channels_last=True)
    info = {k: ckpt[k] for k in ("arch", "epoch", "val_accuracy", "resolution", "weights", "config")}
    return LoadedModel(model, preprocess, ckpt["classes"], ckpt["loss"], ckpt.get("tta_flip", False), dev, info)


def align_labels(loaded: LoadedModel, data: ImageSet) -> np.ndarray:
    """Map the data set's class indices onto the checkpoint's by name."""
    unknown = [c for c in data.classes if c not in loaded.classes]
    if unknown:
        raise DataError(
            f"class folder {unknown[0]!r} is not one of the checkpoint's classes ({', '.join(loaded.classes)})"
        )
    mapping = np.asarray([loaded.classes.index(c) for c in data.classes], dtype=np.int64)
    return mapping[data.labels]


def evaluate_arrays(loaded: LoadedModel, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> dict:
    """Accuracy, loss (the checkpoint's loss), per-class accuracy and confusion matrix."""
    k = len(loaded.classes)
    probs = loaded.probabilities(images, batch_size)
    y = torch.as_tensor(labels)
    if loaded.loss == "mse":
        loss = F.mse_loss(probs, F.one_hot(y, k).float()).item()
    else:  # the run's own criterion, so a test loss compares with its validation loss
        smoothing = loaded.info["config"].get("label_smoothing", 0.0)
        loss = F.cross_entropy(probs.clamp_min(1e-12).log(), y, label_smoothing=smoothing).item()
    pred = probs.argmax(1)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = {
        c: (confusion[i, i].item() / confusion[i].sum().item()) if confusion[i].sum() else None
        for i, c in enumerate(loaded.classes)
    }
    return {
        "accuracy": (pred == y).float().mean().item() if len(y) else 0.0,
        "loss": loss,
        "n": len(y),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": loaded.classes,
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: ImageSet,
    *,
    indices: np.ndarray | None = None,
    device: str = "auto",
    batch_size: int = 500,
) -> dict:
    loaded = load_checkpoint(checkpoint, device)
    labels = align_labels(loaded, data)
    images = data.images
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return evaluate_arrays(loaded, images, labels, batch_size)


def predict_files(checkpoint: str | Path, files: list[str | Path], *, top: int = 3, device: str = "auto") -> list[dict]:
    loaded = load_checkpoint(checkpoint, device)
    results = []
    for path in files:
        image = decode_image(Path(path))
        side = min(image.shape[:2])
        if image.shape[0] != image.shape[1]:  # centre square; the preprocessing resizes it as in training
            image = decode_image(Path(path), (side, side))
        probs = loaded.probabilities(image[None])[0]
        values, order = probs.topk(min(top, len(loaded.classes)))
        results.append(
            {
                "file": str(path),
                "top": [
                    {"class": loaded.classes[i], "probability": v} for v, i in zip(values.tolist(), order.tolist())
                ],
            }
        )
    return results
