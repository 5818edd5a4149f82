"""The learning-rate range test (L. N. Smith, 2017; fastai's lr_find): at which peak lr should a run train?

From a run's config the model, data, split, preprocessing, loss, optimiser and frozen-prefix feature cache are built
exactly as training builds them (run.prepare_run, run.build_run), and training steps (loop.train_step, the one step) are
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
import math
from collections.abc import Callable
from pathlib import Path

from ..config.identity import SECTIONS, fingerprint, identity
from ..config.lr_find import END_LR, START_LR, STEPS, check_range
from ..config.run import RunConfig
from ..data.imageset import ImageSet
from ..models.weights import weights_identity
from ..progress import bar
from . import loop
from .features import FeatureCache
from .lr_curve import BETA, DIVERGED, RULE, LRFindResult, SmoothedLoss, learning_rates, suggest
from .run import batch_bounds, build_run, prepare_run

# The config section the range test never reads (lr, schedule, epochs...: it sets the lr itself): configs differing
# only in it share one finding
NOT_READ = "schedule"


def finding_key(config: RunConfig, data_key: str, *, start_lr=START_LR, end_lr=END_LR, steps=STEPS) -> str:
    """What a finding depends on: every setting the test reads (all sections but the schedule), the data, the
    starting weights, the test's range and the rule. A study stores its findings under this key."""
    settings = identity(config, sections=tuple(s for s in SECTIONS if s != NOT_READ))
    return "lr_find:" + fingerprint({"config": settings, "data": data_key,
                                     "weights": weights_identity(config.arch, config.weights),
                                     "test": [start_lr, end_lr, steps, BETA, DIVERGED, RULE]})  # fmt: skip


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
    check_range(start_lr, end_lr, steps)
    # peak lr 1: each parameter group's initial lr is then its ratio to the swept rate, the factor train_step takes
    data = prepare_run(dataclasses.replace(config, lr=1.0), out, images=images)
    run = build_run(data, feature_cache=feature_cache, log=log)
    batch, n = data.config.batch_size, len(data.split.train)
    rates = learning_rates(start_lr, end_lr, steps)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    bounds = batch_bounds(n, batch)  # an epoch's batches, as training takes them
    order, position, ema, lowest, stop = None, len(bounds), SmoothedLoss(), math.inf, None
    with bar(steps, "lr range test", unit="step", enabled=data.config.progress) as progress:
        for lr in rates.tolist():
            if position >= len(bounds):  # a new pass over the training split
                order, position = loop.start_epoch(run, 1), 0
            start, stop_at = bounds[position]
            position += 1
            loss = loop.train_step(run, order[start:stop_at], lr)[0].item()
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
    del run, data  # the model, its optimiser and data on the device: nothing of it is kept
    suggestion, reason = suggest(lrs, smoothed, steps)
    result = LRFindResult(lrs, losses, smoothed, suggestion, len(lrs) < steps, reason, stop, steps, start_lr, end_lr)
    if out is not None:
        result.save(out, config)
    return result
