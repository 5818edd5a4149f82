"""The lr range test's curve: the rates it steps through, the smoothed loss, the suggested rate and the figure.
Pure functions of recorded numbers (numpy, matplotlib): the report draws stored curves with them, and the test itself
(lr_find.py) records them."""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is

from ..config.lr_find import END_LR, START_LR, STEPS
from ..config.run import RunConfig
from ..fsutil import atomic_write_bytes, atomic_write_json

BETA = 0.98  # the loss average's decay
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
MIN_FALL = 0.05  # a descent must take at least this fraction off the smoothed loss
RULE = "steepest-descent-capped-2"  # names the rule above in stored findings: change it when the rule changes
FIGURE_FILE, RECORD_FILE = "lr_find.png", "lr_find.json"  # what `save` writes into a folder


@dataclass
class LRFindResult:
    lrs: list[float]  # the rate of each recorded step
    losses: list[float]  # its batch loss
    smoothed: list[float]  # the bias-corrected moving average of the losses
    suggestion: float | None  # None: the curve shows no descent to read (`reason` says why)
    stopped_early: bool  # fewer steps recorded than asked for
    reason: str  # how the suggestion was read, or why there is none
    stop: str | None = None  # why the test stopped early
    steps: int = STEPS
    start_lr: float = START_LR
    end_lr: float = END_LR

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: the suggestion (or why there is none) and how the test went."""
        ran = f"{len(self.lrs)} of {self.steps} steps from {self.start_lr:g} to {self.end_lr:g}"
        ran += f", stopped early: {self.stop}" if self.stopped_early else ""
        if self.suggestion is None:
            return f"no suggested lr: {self.reason} ({ran})"
        return f"suggested lr {self.suggestion:.3g} ({self.reason}; {ran})"

    def figure(self) -> Figure:
        """The loss against the lr (log axis), raw and smoothed, the suggestion marked (shows in a notebook)."""
        curve = {"label": "loss", "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed,
                 "suggestion": self.suggestion}  # fmt: skip
        return curves_figure([curve])

    def save(self, out_dir: str | Path, config: RunConfig | None = None) -> tuple[Path, Path]:
        """lr_find.png (the figure) and lr_find.json (the curve, the suggestion and the run config) in `out_dir`."""
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        png, record = out / FIGURE_FILE, out / RECORD_FILE
        atomic_write_bytes(figure_png(self.figure()), png, "lr range test figure")
        atomic_write_json({**self.to_dict(), "config": config.to_dict() if config else None}, record, "lr range test")
        return png, record


# ------------------------------------------------------------------------------ the curve
def learning_rates(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """`steps` rates from start_lr to end_lr, each a constant factor above the last."""
    return np.geomspace(start_lr, end_lr, steps)


class SmoothedLoss:
    """The exponential moving average of the losses so far, bias-corrected (divided by 1 - beta**n): a weighted mean
    of them (nearly equal weights at first), never pulled towards the zero the average starts from."""

    def __init__(self, beta: float = BETA):
        self.beta, self.average, self.n = beta, 0.0, 0

    def add(self, loss: float) -> float:
        self.n += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        return self.average / (1 - self.beta**self.n)


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    smoothed = SmoothedLoss(beta)
    return [smoothed.add(loss) for loss in losses]


def suggest(lrs: list[float], smoothed: list[float], steps: int) -> tuple[float | None, str]:
    """The lr of the steepest descent of the smoothed loss against log10(lr) -> (lr, how), or (None, why not)."""
    s, x = np.asarray(smoothed, dtype=float), np.log10(np.asarray(lrs, dtype=float))
    skip = steps // 10
    if len(s) <= skip + 2:
        return None, f"only {len(s)} steps before it stopped, too few to read a descent (start lower: start_lr)"
    low = skip + int(np.argmin(s[skip:]))
    if low < skip + 2:
        return None, (
            f"the smoothed loss is lowest at lr {lrs[low]:.3g}, at the start of the curve: no descent to read "
            "(start lower: start_lr)"
        )
    fall = s[skip] - s[low]
    if not fall > MIN_FALL * abs(s[skip]):
        return None, (
            f"the smoothed loss falls by only {fall:.3g} from {s[skip]:.3g}: no descent to read "
            "(widen the range, start_lr / end_lr, or take more steps)"
        )
    slopes = np.gradient(s[skip : low + 1], x[skip : low + 1])
    best = int(np.argmin(slopes))
    steepest, cap = float(lrs[skip + best]), float(lrs[low]) / 10
    if cap < steepest:  # the steepest descent lies within a decade of the minimum, next to where the loss turns up
        return (
            cap,
            f"a tenth of the lr of the smoothed loss's minimum ({lrs[low]:.3g}); the steepest descent was at "
            f"{steepest:.3g}",
        )
    return steepest, f"steepest descent of the smoothed loss, {slopes[best]:.3g} per decade of lr"


# ------------------------------------------------------------------------------ the figure
def curves_figure(curves: list[dict]) -> Figure:
    """Smoothed loss against lr (log axis), one line per curve ({label, lrs, smoothed, suggestion}, optionally the
    raw `losses`, drawn faint), each suggestion marked. The CLI's lr_find.png and the study report draw it."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    top, bottom = -math.inf, math.inf
    for i, c in enumerate(curves):
        colour = f"C{i % 10}"
        if not c["lrs"]:
            continue
        if c.get("losses"):  # faint, and named: the suggestion reads the smoothed line, not these steps
            ax.plot(c["lrs"], c["losses"], color=colour, alpha=0.25, linewidth=0.8, label=f"{c['label']}, each step")
        ax.plot(c["lrs"], c["smoothed"], color=colour, label=f"{c['label']}, smoothed")
        top, bottom = max(top, max(c["smoothed"])), min(bottom, *c["smoothed"], *(c.get("losses") or []))
        if c.get("suggestion") is not None:
            at = int(np.argmin(np.abs(np.log(c["lrs"]) - math.log(c["suggestion"]))))
            ax.axvline(c["suggestion"], color=colour, linestyle="--", linewidth=0.8)
            ax.plot([c["suggestion"]], [c["smoothed"][at]], "o", color=colour,
                    label=f"suggested lr {c['suggestion']:.3g}")  # fmt: skip
    ax.set_xscale("log")
    if math.isfinite(top):
        span = max(top - bottom, 1e-12)
        ax.set_ylim(bottom - 0.05 * span, top + 0.1 * span)  # the raw losses of the last steps may rise above it
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()
