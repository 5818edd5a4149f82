"""The one scoring path: accuracy, balanced accuracy, macro-F1, per-class precision / recall / F1, the run's own
(unweighted) loss, NLL and the expected calibration error, from (V, N, K) view logits and labels. Validation during
training, `evaluate` and the study's test evaluation all score here."""

from __future__ import annotations

import torch

from ..errors import DataError
from .calibration import nll, probability_loss, view_predictions


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
