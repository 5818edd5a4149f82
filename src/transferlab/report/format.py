"""How the report says a number: the precision rule (no digit finer than its uncertainty), durations, and the
small helpers every table and section shares (a trial's values, the regimes' order and colours, configurations)."""

from __future__ import annotations

import math
import re
import shlex
import statistics
from collections import defaultdict
from pathlib import Path

from ..config.metrics import DEFAULT_METRIC, higher_is_better
from ..config.metrics import metric as metric_of
from ..config.study import REPLICATE_AXES, configuration_of, point_key, replicate_axes
from ..scoring.selection import Tie
from ..scoring.stats import (
    decimals_for,
    interval_decimals,
    percent,
    percent_with_interval,
)
from ..study.records import Selection, TrialRecord
from .data import SearchData, StudyData

PAPER_AXES = ("strategy", "batch_size", "epochs")  # the study's own axes: what the paper's tables are laid out by


# ------------------------------------------------------------------------------ formatting
# The precision rule (stats.decimals_for): a percentage shows no digit finer than its 95% interval. A proportion of n
# images gets its Wilson interval's precision; a mean over replicates the coarser of that and the replicates' spread.
def _share(value: float | None, n: int | None, missing: str = "") -> str:
    """A proportion measured on n images, as a percentage at its interval's precision (one decimal where n is not
    recorded, in trials written before it was)."""
    if value is None:
        return missing
    if not n:
        return f"{100 * value:.1f}%"
    return percent(round(value * n), n)


def _decimals(values: list[float], n: int | None, reference: list[float] | None = None) -> int:
    """Decimals for the mean of replicate proportions of n images each (or of differences between such proportions,
    `reference` then being the proportions): no finer than the Wilson interval, nor than the replicates' spread."""
    mean = statistics.fmean(reference or values)
    wilson = interval_decimals(round(mean * n), n) if n else 1
    return min(wilson, decimals_for(100 * statistics.stdev(values))) if len(values) > 1 else wilson


def _shares(values: list[float], n: int | None) -> str:
    """Proportions of n images each: one as _share, replicates as mean ± sample std."""
    if not values:
        return ""
    if len(values) == 1:
        return _share(values[0], n)
    d = _decimals(values, n)
    return f"{100 * statistics.fmean(values):.{d}f} ± {100 * statistics.stdev(values):.{d}f}%"


def _points(values: list[float], n: int | None, reference: list[float]) -> str:
    """Differences of proportions of n images each (`reference`: the proportions), in percentage points, at the
    proportions' precision."""
    if not values:
        return ""
    d = _decimals(values, n, reference)
    if len(values) == 1:
        return f"{100 * values[0]:+.{d}f} pp"
    return f"{100 * statistics.fmean(values):+.{d}f} ± {100 * statistics.stdev(values):.{d}f} pp"


def _n_val(trials: list[TrialRecord]) -> int | None:
    """The validation images the trials' accuracies were measured on (the fewest, should they differ)."""
    found = [t.n_val for t in trials if t.n_val]
    return min(found) if found else None


def _n_train(trials: list[TrialRecord]) -> int | None:
    found = [t.n_train for t in trials if t.n_train]
    return min(found) if found else None


def _test_accuracy(t: Selection) -> str:
    """The selected trial's test accuracy with its Wilson 95% interval, at the precision the interval justifies
    ("67.4% (95% CI 65.3-69.4)"): accuracy is k correct of n_test images."""
    n = t.n_test
    return percent_with_interval(round(t.test_accuracy * n), n)


WILSON_NOTE = (
    "The 95% CI of a test accuracy is the Wilson score interval of a proportion measured on that many images: how "
    "far the figure could move on another test set of the same size, so digits finer than it are not printed."
)


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


# ------------------------------------------------------------------------------ grouping
REGIME_ORDER = ("frozen", "partial", "full")

REGIME_COLOURS = {"frozen": "#1f77b4", "partial": "#ff7f0e", "full": "#2ca02c"}

OTHER_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _final_row(trial: TrialRecord) -> dict:
    """The figures a run of this many epochs reports: those of its last epoch (the paper's convention)."""
    return trial.history[-1]


def _other_axes(data: StudyData) -> list[str]:
    return [a for a in data.grid if a not in PAPER_AXES and a not in REPLICATE_AXES]


def _value(trial: TrialRecord, axis: str):
    return trial.point.get(axis, trial.config.get(axis))


def _natural(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _regimes(data: StudyData) -> list[str]:
    """One order in every table and figure: frozen, partial, full, then any others by name."""
    found = {_value(t, "strategy") for t in data.trials}
    return [r for r in REGIME_ORDER if r in found] + sorted(str(r) for r in found if r not in REGIME_ORDER)


def _colour(regime: str) -> str:
    """A regime's colour, the same in every figure of every report."""
    if regime in REGIME_COLOURS:
        return REGIME_COLOURS[regime]
    return OTHER_COLOURS[sum(map(ord, str(regime))) % len(OTHER_COLOURS)]


def _epochs_of(data: StudyData) -> list[int]:
    return sorted({_value(t, "epochs") for t in data.trials})


def _runs(data: StudyData) -> list[dict]:
    """The trainings that actually happened: derived trials are epoch prefixes of one of these (a search's pruned
    trials trained too, and are not among the trials)."""
    return [t for t in data.trials if t.kind in ("run", "search")]


def _setting(t: TrialRecord, data: StudyData, skip=("strategy", "epochs", *REPLICATE_AXES)) -> str:
    """What distinguishes trials of one regime and epoch count: batch size and any other axis."""
    return ", ".join(
        f"batch size {_value(t, a)}" if a == "batch_size" else f"{a} = {_value_text(_value(t, a))}"
        for a in data.grid
        if a not in skip
    )


def _like(value: float | None, reference: float, n: int | None) -> str:
    """A rate that is no simple proportion (balanced accuracy, macro-F1) at the precision of an accuracy measured on
    the same n images."""
    if value is None:
        return ""
    d = interval_decimals(round(reference * n), n) if n else 1
    return f"{100 * value:.{d}f}%"


def _best_epoch(t: TrialRecord) -> str:
    """The best epoch, and the tie it broke when others scored the same (selection.epoch_tie)."""
    tie = t.best_epoch_tie
    if not tie:
        return str(t.best["epoch"])
    return f"{t.best['epoch']} ({Tie.from_dict(tie).words()})"


# ------------------------------------------------------------------------------ replicates (seeds, folds)
def _metric(data: StudyData) -> str:
    return data.spec.get("metric", DEFAULT_METRIC)


def _configuration_axes(data: StudyData) -> list[str]:
    return [a for a in data.grid if a not in REPLICATE_AXES]


def configurations(data: StudyData) -> list[tuple[dict, list[dict]]]:
    """Each configuration (a grid point without its replicate axes) with its trials, in order of first trial."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for t in sorted(data.trials, key=lambda t: t.number):
        config = configuration_of(t.point, replicate_axes(data.grid))
        groups.setdefault(point_key(config), (config, []))[1].append(t)
    return list(groups.values())


def _replicate_words(data: StudyData) -> str:
    """'3 replicates (seed 0, 1, 2)': how many replicates a configuration has, and what they are."""
    axes = replicate_axes(data.grid)
    n = math.prod(len(data.grid[a]) for a in axes)
    return (
        f"{n} replicate{'s' * (n != 1)} (" + "; ".join(f"{a} {', '.join(map(str, data.grid[a]))}" for a in axes) + ")"
    )


def _mean_std(values: list[float], metric: str, n_val: int | None) -> str:
    return _shares(values, n_val) if metric_of(metric).rate else _fmt(values)


def _searched(data: StudyData) -> list[str]:
    """The options the study's searches sample (none without [search])."""
    return [k.replace("-", "_") for k in data.spec.get("search", {}).get("space", {})]


def _natural_setting(t: TrialRecord, data: StudyData) -> tuple:
    return tuple(_natural(_value(t, a)) for a in data.grid if a not in ("strategy", "epochs", *REPLICATE_AXES))


def _baseline(variants: list) -> str:
    return "baseline" if "baseline" in variants else variants[0]


def _variant_means(data: StudyData) -> dict[tuple, float]:
    """(variant, regime) -> mean best validation accuracy over its trials."""
    found: dict[tuple, list[float]] = defaultdict(list)
    for t in data.trials:
        found[(_value(t, "variant"), _value(t, "strategy"))].append(t.best["val_accuracy"])
    return {k: statistics.mean(v) for k, v in found.items()}


def _difference_metric(data: StudyData) -> str:
    """What paired differences compare, in points: the selection metric, or validation accuracy when that is the
    loss (a loss has no points)."""
    return _metric(data) if metric_of(_metric(data)).rate else "val_accuracy"


def _name(axis: str, value) -> str:
    return str(value) if axis in ("strategy", "variant", "arch") else f"{axis} {_value_text(value)}"


def _metric_value(value: float, metric: str, n: int | None) -> str:
    return _share(value, n) if metric_of(metric).rate else f"{value:.4f}"


def _selection_n_val(t: Selection) -> int | None:
    """The validation images of the selected trial (older selections: from its class counts, if recorded)."""
    if t.n_val:
        return t.n_val
    counts = (t.class_counts or {}).get("val")
    return sum(counts.values()) if counts else None


def tie_words(t: Selection) -> str:
    """The selection's tie in words, or "" when the metric decided."""
    tie = t.tie
    if not tie:
        return ""
    what = "configurations" if t.configuration else "trials"
    return Tie.from_dict(tie).words(what, t.metric)


# ------------------------------------------------------------------------------ summary and reuse
def _selected_trial(data: StudyData) -> dict | None:
    if not data.test:
        return None
    if data.test.identity:  # trial numbers repeat across a study's searches; identities do not
        return next((t for t in data.trials if t.identity == data.test.identity), None)
    return next((t for t in data.trials if t.number == data.test.trial), None)


def _by_replicate(trials: list[TrialRecord], metric: str, replicates: list[str]) -> dict[tuple, float | None]:
    """A configuration's metric per replicate (its seed / fold values), in points for rates, as recorded for a loss."""
    scale = 100 if metric_of(metric).rate else 1
    values = {tuple(str(t.point.get(a)) for a in replicates): t.best.get(metric) for t in trials}
    return {k: None if v is None else scale * v for k, v in values.items()}


def point_key_text(config: dict) -> str:
    return ", ".join(f"{k} = {_value_text(v)}" for k, v in config.items()) or "the other configuration"


def _quote(path: str | Path) -> str:
    return shlex.quote(str(path))


def _rate(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:,.1f}"


def _ratio(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


# ------------------------------------------------------------------------------ searches
def _finished(search: SearchData) -> list[dict]:
    """The trials that count towards n_trials: complete or pruned, not skipped, by number."""
    return sorted(
        (t for t in search.trials if t.state in ("COMPLETE", "PRUNED") and not t.skipped),
        key=lambda t: t.number,
    )


def _improves(value: float, best: float | None, metric: str) -> bool:
    return best is None or (value > best if higher_is_better(metric) else value < best)


def _describe(dimension) -> str:
    """A [search.space] entry in words."""
    if isinstance(dimension, list):
        return "one of " + ", ".join(map(str, dimension))
    text = f"{'log ' if dimension.get('log') else ''}range {dimension['low']} .. {dimension['high']}"
    return text + (f", step {dimension['step']}" if dimension.get("step") is not None else "")


def _value_text(value) -> str:
    """A point's value wherever the report shows one (tables, captions, legends): a float at 4 significant digits
    (a sampled lr's 17 digits say no more than 4); the stored keys keep every digit."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_FLOAT_IN_KEY = re.compile(r"(?<==)-?(?:\d*\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+)(?=,|$)")


def key_text(key: str) -> str:
    """A stored point key (config.study.point_key: "dropout=0.2036333172,lr=...") as shown: its floats as
    _value_text."""
    return _FLOAT_IN_KEY.sub(lambda m: _value_text(float(m[0])), key)
