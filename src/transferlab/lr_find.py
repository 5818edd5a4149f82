"""The learning-rate range test (L. N. Smith, 2017; fastai's lr_find): at which peak lr should a run train?

From a run's config the model, data, split, preprocessing, loss, optimiser and frozen-prefix feature cache are built
exactly as training builds them (train.Trainer), and training steps (Trainer.train_step, the one training step) are
taken at a learning rate growing exponentially from `start_lr` to `end_lr` over `steps` steps; when one pass over
the training split has fewer batches, the test cycles over it, a fresh seeded order each pass. Every step's batch loss
is recorded and smoothed (an exponential moving average, beta 0.98, bias-corrected so that it does not start
near zero); the test stops early when the smoothed loss exceeds 4 times its minimum so far, or when a loss is not
finite. The model is thrown away afterwards; only the feature cache, which training shares, keeps anything.

The config's schedule, warm-up and epochs are not used (the test sets the lr itself); discriminative learning rates
(`lr_group_decay`) keep their ratios to the swept lr; gradual unfreezing trains what its first epoch trains.

The suggested rate (`suggest`): the lr at which the smoothed loss falls fastest against log10(lr), looked for after
the first tenth of the steps (the average's first values rest on few batches) and up to the smoothed loss's minimum.
There is none, with the reason, when the curve holds no descent to read: its minimum lies at the start of that
window, or the smoothed loss falls by less than 5% of its value there. The steepest point can sit just before the
loss turns up (a cliff before divergence), so the suggestion is capped at a tenth of the lr of the smoothed loss's
minimum (fastai's older `lr_min / 10` rule): the smaller of the two.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ConfigError, RunConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from matplotlib.figure import Figure

    from .data import ImageSet
    from .features import FeatureCache

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
MIN_STEPS = 10
BETA = 0.98  # the loss average's decay
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
MIN_FALL = 0.05  # a descent must take at least this fraction off the smoothed loss
RULE = "steepest-descent-capped-2"  # names the rule above in stored findings: change it when the rule changes
# RunConfig fields the range test never reads (only the epochs' lr schedule and the run's bookkeeping do): configs
# differing in them share one finding
NOT_READ = ("lr", "epochs", "schedule", "warmup_epochs", "step_every", "record_epochs", "metric")


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
        curve = {"label": "smoothed loss", "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed,
                 "suggestion": self.suggestion}  # fmt: skip
        return curves_figure([curve])

    def save(self, out_dir: str | Path, config: RunConfig | None = None) -> tuple[Path, Path]:
        """lr_find.png (the figure) and lr_find.json (the curve, the suggestion and the run config) in `out_dir`."""
        from .fsutil import atomic_write_bytes, atomic_write_json

        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        png, record = out / "lr_find.png", out / "lr_find.json"
        atomic_write_bytes(figure_png(self.figure()), png, "lr range test figure")
        atomic_write_json({**self.to_dict(), "config": config.to_dict() if config else None}, record, "lr range test")
        return png, record


# ------------------------------------------------------------------------------ the curve
def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    """The test's own settings, refused in one line when they cannot make a curve."""
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} = {value!r}: expected a positive learning rate")
    if start_lr >= end_lr:
        raise ConfigError(f"start_lr = {start_lr:g} must be below end_lr = {end_lr:g}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS:
        raise ConfigError(f"steps = {steps!r}: expected a whole number of at least {MIN_STEPS}")


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


def finding_key(config: RunConfig, data_key: str, *, start_lr=START_LR, end_lr=END_LR, steps=STEPS) -> str:
    """What a finding depends on: every setting the test reads (all but NOT_READ), the data, the starting weights,
    the test's range and the rule. A study stores its findings under this key."""
    from .models import weights_identity

    settings = {k: v for k, v in config.training_dict().items() if k not in NOT_READ}
    blob = json.dumps(
        {"config": settings, "data": data_key, "weights": weights_identity(config.arch, config.weights),
         "test": [start_lr, end_lr, steps, BETA, DIVERGED, RULE]},
        sort_keys=True, default=str,
    )  # fmt: skip
    return f"lr_find:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------ running it
def lr_find(
    config: RunConfig,
    out: str | Path | None = None,
    *,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
    images: ImageSet | None = None,
    feature_cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
) -> LRFindResult:
    """Library entry point: `transferlab.lr_find(RunConfig(...))`; with `out`, also lr_find.png and lr_find.json
    there. Seeded by config.seed: the same config gives the same curve."""
    from .progress import bar
    from .train import Trainer, batch_bounds

    check_range(start_lr, end_lr, steps)
    # peak lr 1: each parameter group's initial lr is then its ratio to the swept rate, the factor train_step takes
    trainer = Trainer(dataclasses.replace(config, lr=1.0), out, images=images, feature_cache=feature_cache, log=log)
    trainer._setup()
    batch, n = trainer.config.batch_size, len(trainer.split.train)
    rates = learning_rates(start_lr, end_lr, steps)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    bounds = batch_bounds(n, batch)  # an epoch's batches, as training takes them
    order, position, ema, lowest, stop = None, len(bounds), SmoothedLoss(), math.inf, None
    with bar(steps, "lr range test", unit="step", enabled=trainer.config.progress) as progress:
        for lr in rates.tolist():
            if position >= len(bounds):  # a new pass over the training split
                order, position = trainer.start_epoch(1), 0
            start, stop_at = bounds[position]
            position += 1
            loss = trainer.train_step(order[start:stop_at], lr)[0].item()
            if not math.isfinite(loss):
                stop = f"the loss is {loss} at lr {lr:.3g}"
                break
            value = ema.add(loss)
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(value)
            lowest = min(lowest, value)
            progress.advance()
            progress.info(f"lr {lr:.2e} loss {value:.4f}")
            if value > DIVERGED * lowest and len(lrs) < steps:
                stop = f"the smoothed loss passed {DIVERGED:g} x its minimum at lr {lr:.3g}"
                break
    del trainer  # the model, its optimiser and data on the device: nothing of it is kept
    suggestion, reason = suggest(lrs, smoothed, steps)
    result = LRFindResult(lrs, losses, smoothed, suggestion, len(lrs) < steps, reason, stop, steps, start_lr, end_lr)
    if out is not None:
        result.save(out, config)
    return result


# ------------------------------------------------------------------------------ the figure
def curves_figure(curves: list[dict]) -> Figure:
    """Smoothed loss against lr (log axis), one line per curve ({label, lrs, smoothed, suggestion}, optionally the
    raw `losses`, drawn faint), each suggestion marked. The CLI's lr_find.png and the study report draw it."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    top, bottom = -math.inf, math.inf
    for i, c in enumerate(curves):
        colour = f"C{i % 10}"
        if not c["lrs"]:
            continue
        if c.get("losses"):
            ax.plot(c["lrs"], c["losses"], color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(c["lrs"], c["smoothed"], color=colour, label=c["label"])
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
