"""One evaluation path for validation during training, `evaluate` and `predict`.

Scoring: class probabilities (the mean of the image's and its mirror's under flip TTA), then accuracy, balanced
accuracy, macro-F1, per-class precision / recall / F1, the run's own (unweighted) loss, NLL and the expected
calibration error computed from them. Calibration: one temperature T, fitted on the validation split after training
(`fit_temperature`), divides the log of those probabilities before a softmax (softmax(logits / T) for one view), so
it never changes the predicted class. Precision: the checkpoint records how
validation ran (bf16 autocast, and the dtype of the frozen groups' cached output), and evaluation repeats it, so
`evaluate best.pt --split val` reproduces the validation figures the trainer recorded.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import Preprocess
from .checkpoint import TEMPERATURE_BOUNDS, Checkpoint, CheckpointError
from .config import ConfigError
from .data import IMAGE_EXTENSIONS, DataError, ImageSet, _image_entries, decode_image
from .features import inference_batch_size
from .models import build_model, get_backbone, resolve_device
from .progress import track

__all__ = ["CheckpointError", "LoadedModel", "evaluate_checkpoint", "expand_inputs", "load_checkpoint", "predict_files"]


# ------------------------------------------------------------------------------ the shared scoring
def suffix_logits(suffix: nn.Module, features: torch.Tensor, *, autocast: bool) -> torch.Tensor:
    """The trainable part on (cached or computed) frozen-group output, in the run's precision; float32 logits."""
    with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=autocast):
        return suffix(features).float()


def tta_probabilities(logits_of: Callable[..., torch.Tensor], tta_flip: bool) -> torch.Tensor:
    """Softmax of the images' logits, averaged with their mirrors' under flip TTA. logits_of(mirror=...) -> logits."""
    probs = logits_of(mirror=False).softmax(1)
    return (probs + logits_of(mirror=True).softmax(1)) / 2 if tta_flip else probs


def probability_loss(log_p: torch.Tensor, probs: torch.Tensor, y: torch.Tensor, *, loss: str,
                     label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """The one definition of a loss on predictions, for history, evaluate and calibration alike: mean squared error of
    the probabilities to one-hot, or (smoothed) cross-entropy of the log-probabilities. The log-probabilities come
    from the logits (log_softmax), never from clamped probabilities, so a confident mistake costs what it costs."""
    if loss == "mse":
        return F.mse_loss(probs.float(), F.one_hot(y, probs.shape[1]).float())
    return F.cross_entropy(log_p, y, label_smoothing=label_smoothing)


def nll(log_p: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true classes (probability_loss's cross-entropy, unsmoothed)."""
    return probability_loss(log_p, log_p, y, loss="ce").item()


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted, on the labels' device."""
    confusion = torch.zeros(k, k, dtype=torch.long, device=y.device)
    return confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)


def balanced_scores(confusion: torch.Tensor) -> dict:
    """Balanced accuracy (mean recall over the classes present in the labels) and macro-F1 (mean over the classes
    present in the labels or the predictions of 2tp / (2tp + fp + fn)); sklearn's balanced_accuracy_score and
    f1_score(average="macro") on the same labels."""
    confusion = confusion.double()
    tp, true, predicted = confusion.diagonal(), confusion.sum(1), confusion.sum(0)
    present = true > 0
    f1_denominator = true + predicted  # 2tp + fp + fn
    seen = f1_denominator > 0
    return {
        "balanced_accuracy": (tp[present] / true[present]).mean().item(),
        "macro_f1": (2 * tp[seen] / f1_denominator[seen]).mean().item(),
    }


def per_class_scores(confusion: torch.Tensor, classes: list[str]) -> dict:
    """{class: {precision, recall, f1, support}} from a confusion matrix; None where undefined (nothing predicted as
    the class, no image of it, or neither), where sklearn would warn and give 0."""
    confusion = confusion.double()
    tp, true, predicted = confusion.diagonal(), confusion.sum(1), confusion.sum(0)
    out = {}
    for i, c in enumerate(classes):
        f1_denominator = true[i] + predicted[i]  # 2tp + fp + fn
        out[c] = {
            "precision": (tp[i] / predicted[i]).item() if predicted[i] else None,
            "recall": (tp[i] / true[i]).item() if true[i] else None,
            "f1": (2 * tp[i] / f1_denominator).item() if f1_denominator else None,
            "support": int(true[i].item()),
        }
    return out


ECE_BINS = 15
TIE_TOLERANCE = 1e-6  # probabilities this close are one value: float32 softmax cannot tell them apart


def reliability(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Expected calibration error of the top-1 confidence, and the reliability diagram's data: `bins` equal-width
    bins (i/B, (i+1)/B], each with its image count, mean confidence and accuracy (None when empty).
    ECE = sum over bins of n_b / N * |accuracy_b - confidence_b|."""
    confidence, pred = probs.double().max(1)
    correct = (pred == y.to(pred.device)).double()
    b = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(b, minlength=bins)
    confidence_sum = torch.zeros(bins, dtype=torch.float64, device=b.device).index_add_(0, b, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.float64, device=b.device).index_add_(0, b, correct)
    count, confidence_sum, correct_sum = count.tolist(), confidence_sum.tolist(), correct_sum.tolist()
    return {
        "ece": sum(abs(a - c) for a, c in zip(correct_sum, confidence_sum)) / len(y),
        "reliability": {
            "bins": bins,
            "count": count,
            "confidence": [s / n if n else None for s, n in zip(confidence_sum, count)],
            "accuracy": [s / n if n else None for s, n in zip(correct_sum, count)],
        },
    }


def scores(view_logits: torch.Tensor, y: torch.Tensor, classes: list[str], *, loss: str, label_smoothing: float,
           temperature: float = 1.0) -> dict:  # fmt: skip
    """Accuracy, balanced accuracy, macro-F1, loss, NLL, ECE with its reliability bins, n, per-class accuracy,
    per-class precision / recall / F1 and confusion matrix of (V, N, K) view logits (view_predictions) against
    labels. The one scoring path: validation, evaluate and the study's test evaluation all come here."""
    if len(y) == 0:
        raise DataError("nothing to evaluate: the selected split holds no images")
    log_p, probs = view_predictions(view_logits, temperature)
    y = y.to(probs.device)
    pred = probs.argmax(1)
    confusion = confusion_matrix(y, pred, len(classes)).cpu()
    per_class = {
        c: (confusion[i, i].item() / confusion[i].sum().item()) if confusion[i].sum() else None
        for i, c in enumerate(classes)
    }
    tied = (probs >= probs.max(1, keepdim=True).values - TIE_TOLERANCE).sum(1) > 1
    return {
        "accuracy": (pred == y).sum().item() / len(y),  # exact: correct / n, not a float32 mean
        "ties": int(tied.sum().item()),  # images whose top classes are equally likely: argmax took the first
        **balanced_scores(confusion),
        "loss": probability_loss(log_p, probs, y, loss=loss, label_smoothing=label_smoothing).item(),
        "nll": nll(log_p, y),
        **reliability(probs, y),
        "n": len(y),
        "per_class_accuracy": per_class,
        "per_class": per_class_scores(confusion, classes),
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
    }


# ------------------------------------------------------------------------------ temperature scaling
def mean_log_probabilities(view_logits: torch.Tensor) -> torch.Tensor:
    """(V, N, K) logits of V views (the image, and its mirror under flip TTA) -> (N, K) log of the mean of their
    softmaxes: the log of what `tta_probabilities` gives, computed without underflow."""
    return torch.logsumexp(view_logits.float().log_softmax(-1), 0) - math.log(view_logits.shape[0])


def view_predictions(view_logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, N, K) logits -> (N, K) log-probabilities and probabilities, the one definition of a prediction. At T = 1 the
    probabilities are the mean of the views' softmaxes (as validation computes them), else softmax(log(that mean) / T),
    which is softmax(logits / T) for one view; the log-probabilities are computed from the logits in log space."""
    log_p = mean_log_probabilities(view_logits)
    if temperature == 1.0:
        return log_p, tta_probabilities(lambda mirror: view_logits[int(mirror)].float(), view_logits.shape[0] == 2)
    log_p = (log_p / temperature).log_softmax(-1)
    return log_p, log_p.exp()


def view_probabilities(view_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(V, N, K) logits -> (N, K) probabilities (view_predictions)."""
    return view_predictions(view_logits, temperature)[1]


TEMPERATURE_RANGE = TEMPERATURE_BOUNDS  # the fit's search range; a checkpoint's T outside it is refused
MIN_CALIBRATION_IMAGES = 50  # fewer validation images than this cannot support a fitted temperature


@dataclass(frozen=True)
class Calibration:
    """The temperature a checkpoint applies, and why: fitted on validation, or 1 (no scaling) with the reason."""

    temperature: float
    fitted: bool
    reason: str
    n: int  # validation images
    val_nll: float  # at T = 1
    val_nll_calibrated: float  # at `temperature`

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fit_temperature(view_logits: torch.Tensor, y: torch.Tensor, steps: int = 80) -> Calibration:
    """The T > 0 minimising the validation NLL of softmax(log p / T), p the views' mean probabilities, where the
    validation images can support one; else T = 1 with the reason. NLL is convex in 1 / T (log-sum-exp of a linear
    function), so a golden-section search over log T in TEMPERATURE_RANGE finds its minimum; deterministic, in float64.

    T stays 1 when there are fewer than MIN_CALIBRATION_IMAGES images, when every image is classified correctly
    (perfectly separated: the NLL then falls all the way to T -> 0, every prediction would read 1.000), when the
    minimum lies at the range's bound (the same collapse, or its opposite), or when no T lowers the NLL."""
    log_p = mean_log_probabilities(view_logits).double()
    y = y.to(log_p.device)
    n = len(y)

    def at(log_t: float) -> float:
        return nll(log_p / math.exp(log_t), y)

    base = at(0.0)

    def keep(reason: str) -> Calibration:
        return Calibration(1.0, False, reason, n, base, base)

    if n < MIN_CALIBRATION_IMAGES:
        return keep(f"{n} validation images are too few to fit a temperature (at least {MIN_CALIBRATION_IMAGES})")
    if bool((log_p.argmax(1) == y).all()):
        return keep(f"all {n} validation images are classified correctly: the fit would drive T to 0 (every "
                    "prediction certain), so no temperature is fitted")  # fmt: skip
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = at(a), at(b)
    for _ in range(steps):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = at(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = at(b)
    best = (lo + hi) / 2
    temperature, fitted_nll = math.exp(best), at(best)
    low, high = TEMPERATURE_RANGE
    if not low * 1.01 < temperature < high / 1.01:
        return keep(f"the fit ran to its bound (T = {temperature:.3g}): the validation images cannot support a "
                    "temperature")  # fmt: skip
    if not fitted_nll < base:
        return keep("no temperature lowers the validation NLL")
    return Calibration(temperature, True, f"fitted on {n} validation images", n, base, fitted_nll)


# ------------------------------------------------------------------------------ checkpoints in use
@dataclass
class LoadedModel:
    model: nn.Module
    prefix: nn.Module  # the groups that were frozen (their output cached) during training
    suffix: nn.Module
    preprocess: Preprocess
    classes: list[str]
    loss: str
    label_smoothing: float
    tta_flip: bool
    autocast: bool
    feature_dtype: torch.dtype | None  # the cached prefix output's dtype, or None when training computed it
    device: torch.device
    info: dict
    temperature: float = 1.0  # fitted on the validation split after training; 1.0 for older checkpoints
    calibration: dict | None = None  # how the temperature was chosen (Calibration.to_dict); None: not recorded

    def logits(self, batch: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        """uint8 (N, H, W, 3) on the device -> float32 logits, computed as validation computed them."""
        x = self.preprocess(batch, mirror=mirror)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            h = self.prefix(x)
        if self.feature_dtype is not None:  # the cache held this precision, so validation saw it
            h = h.to(self.feature_dtype).float()
        return suffix_logits(self.suffix, h, autocast=self.autocast)

    @torch.no_grad()
    def view_logits(
        self, images: np.ndarray | torch.Tensor, batch_size: int | None = None, tta_flip: bool | None = None
    ) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (V, N, K) float32 logits on the CPU, V = 2 under flip TTA (the mirror second);
        `batch_size` images at a time (default: features.inference_batch_size)."""
        batch_size = batch_size or inference_batch_size(self.device, self.preprocess.resolution)
        views = 2 if (self.tta_flip if tta_flip is None else tta_flip) else 1
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # Pillow's arrays are read-only; torch warns about those
        images = torch.as_tensor(images)
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device)
            out.append(torch.stack([self.logits(batch, mirror=bool(v)).cpu() for v in range(views)]))
        return torch.cat(out, 1) if out else torch.zeros(views, 0, len(self.classes))

    def probabilities(
        self,
        images: np.ndarray | torch.Tensor,
        batch_size: int | None = None,
        tta_flip: bool | None = None,
        calibrated: bool = True,
    ) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (N, K) class probabilities (on the CPU), scaled by the checkpoint's temperature
        unless calibrated=False (then as validation computed them)."""
        logits = self.view_logits(images, batch_size, tta_flip)
        return view_probabilities(logits, self.temperature if calibrated else 1.0)


def load_checkpoint(path: str | Path, device: str = "auto") -> LoadedModel:
    ckpt = Checkpoint.load(path)
    dev = resolve_device(device)
    model, _ = build_model(ckpt.arch, len(ckpt.classes), weights="none", head=ckpt.head, dropout=ckpt.dropout)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit {ckpt.arch}: {str(error).splitlines()[0]}") from None
    model.to(dev, memory_format=torch.channels_last).eval()
    backbone = get_backbone(ckpt.arch)
    prefix, suffix = backbone.split(model, ckpt.cut)
    info = {k: getattr(ckpt, k) for k in ("arch", "epoch", "metric", "val_accuracy", "val_loss", "resolution",
                                          "weights", "config", "data", "resize_policy", "storage_size",
                                          "stored_side", "crop_fraction", "interpolation")}  # fmt: skip
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


def stored_as_trained(loaded: LoadedModel, config) -> ImageSet:
    """The images `config` names, each stored exactly as the checkpoint's run stored its own: the run's resize policy
    and its stored side (every file at that side, enlarged or reduced). Decoded first as the run decoded (its storage
    size, cached): the run's own data, or any set that comes out at the same side, is read from its cache; a set that
    comes out at another side is decoded again at the run's. (Checkpoints before format 4 did not record the side:
    files are stored at most at the run's storage size, as before.)"""
    from .data import load_images

    data = load_images(config, loaded.info["storage_size"])
    side = loaded.info.get("stored_side")
    if side is not None and data.stored_side != side:
        data = load_images(config, loaded.info["storage_size"], side=side)
    return data


def split_applies(run_dir: str | Path, data: ImageSet) -> bool | None:
    """Whether the run's split.json names these very images: its training and validation rows hold, pixel for pixel,
    the images the run recorded (digests.npz), wherever the files lie. None where the run recorded no digests."""
    try:
        with np.load(Path(run_dir) / "digests.npz") as saved:
            train, val = saved["train"], saved["val"]
        split = json.loads((Path(run_dir) / "split.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    rows = [np.asarray(split[part], dtype=np.int64) for part in ("train", "val")]
    if any(len(r) and r.max() >= len(data) for r in rows):
        return False
    digests = data.digests()
    return bool(np.array_equal(digests[rows[0]], train) and np.array_equal(digests[rows[1]], val))


def seen_in_training(run_dir: str | Path, digests: np.ndarray) -> dict[str, int] | None:
    """How many of these images (ImageSet.digests) the run trained and validated on: pixel for pixel the same stored
    image, whatever file or folder it came from. None where the run folder has no digests (written before them)."""
    path = Path(run_dir) / "digests.npz"
    try:
        with np.load(path) as saved:
            return {part: int(np.isin(digests, saved[part]).sum()) for part in ("train", "val")}
    except (OSError, ValueError, KeyError):
        return None


def decode_as_trained(loaded: LoadedModel, path: str | Path) -> np.ndarray:
    """One file stored exactly as the checkpoint's run stored its images (see stored_as_trained)."""
    side = loaded.info.get("stored_side")
    if side is not None:
        return decode_image(Path(path), side, loaded.info["resize_policy"])
    return decode_image(Path(path), loaded.info["storage_size"], loaded.info["resize_policy"], upscale=False)


def align_labels(loaded: LoadedModel, data: ImageSet) -> np.ndarray:
    """Map the data set's class indices onto the checkpoint's by name."""
    unknown = [c for c in data.classes if c not in loaded.classes]
    if unknown:
        raise DataError(f"class {unknown[0]!r} is not one of the checkpoint's classes ({', '.join(loaded.classes)})")
    mapping = np.asarray([loaded.classes.index(c) for c in data.classes], dtype=np.int64)
    return mapping[data.labels]


def evaluate_arrays(loaded: LoadedModel, images: np.ndarray, labels: np.ndarray, batch_size: int | None = None) -> dict:
    """`scores` of the model's probabilities as validation computed them (accuracy, the checkpoint's loss, per-class
    figures, confusion matrix, NLL, ECE), plus the checkpoint's temperature and the NLL, ECE and reliability bins of
    the calibrated probabilities (accuracy is the same: T does not change the argmax)."""
    return evaluate_logits(loaded, loaded.view_logits(images, batch_size), torch.as_tensor(labels))


def evaluate_logits(loaded: LoadedModel, logits: torch.Tensor, y: torch.Tensor) -> dict:
    """`evaluate_arrays` of (V, N, K) logits already computed by `loaded.view_logits`."""
    options = {"loss": loaded.loss, "label_smoothing": loaded.label_smoothing}
    result = scores(logits, y, loaded.classes, **options)
    calibrated = scores(logits, y, loaded.classes, **options, temperature=loaded.temperature)
    return {
        **result,
        "temperature": loaded.temperature,
        "calibration": loaded.calibration,
        "nll_calibrated": calibrated["nll"],
        "ece_calibrated": calibrated["ece"],
        "reliability_calibrated": calibrated["reliability"],
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: ImageSet,
    *,
    indices: np.ndarray | None = None,
    device: str = "auto",
    batch_size: int | None = None,
) -> dict:
    loaded = load_checkpoint(checkpoint, device)
    labels = align_labels(loaded, data)
    images = data.images
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return evaluate_arrays(loaded, images, labels, batch_size)


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
                entries = _image_entries(Path(path))
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
