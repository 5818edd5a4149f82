"""Probabilities from logits, in one definition, and temperature scaling.

A prediction is the mean of the views' softmaxes (the image, and its mirror under flip TTA); its log is computed
from the logits in log space. Calibration: one temperature T, fitted on the validation split after training where
the validation images can support one, divides the log of those probabilities before a softmax (softmax(logits / T)
for one view), so it never changes the predicted class."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def tta_probabilities(logits_of: Callable[..., torch.Tensor], tta_flip: bool) -> torch.Tensor:
    """Softmax of the images' logits, averaged with their mirrors' under flip TTA. logits_of(mirror=...) -> logits."""
    probs = logits_of(mirror=False).softmax(1)
    return (probs + logits_of(mirror=True).softmax(1)) / 2 if tta_flip else probs


# ------------------------------------------------------------------------------ temperature scaling
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


TEMPERATURE_RANGE = (0.01, 100.0)  # the fit's search range; a checkpoint's T outside it is refused

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
