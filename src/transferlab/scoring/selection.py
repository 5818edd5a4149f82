"""Which is best: one rule for a run's best epoch, a study's best trial and its best configuration, ties included.

The selection metric decides (its direction from `config.higher_is_better`). A tie on it is broken by validation loss
(lower wins; by validation accuracy when the metric is the loss itself), then by the lower cost: the earlier epoch,
the trial of fewer epochs, then the lower trial number. Every choice that needed a tie-break says so (`Tie`), and the
report and metrics.json repeat it: a selection that was a tie was not decided by the metric.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.metrics import higher_is_better
from ..config.metrics import metric as metric_of


def _signed(value: float | None, higher: bool) -> float:
    """A value to maximise: the metric itself or its negation; a missing or NaN value ranks last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return value if higher else -value


def secondary_metric(metric: str) -> str:
    """What breaks a tie on `metric`: validation loss, or validation accuracy when the metric is the loss."""
    return metric_of(metric).tie_break


def row_key(row: dict, metric: str) -> tuple[float, float]:
    """An epoch's rank: the metric, then the tie-break metric (both as values to maximise)."""
    second = secondary_metric(metric)
    return _signed(row.get(metric), higher_is_better(metric)), _signed(row.get(second), higher_is_better(second))


def improves(row: dict, best: dict | None, metric: str) -> bool:
    """Is this epoch better than the best so far? Ties on the metric go to the lower validation loss; full ties keep
    the earlier epoch (the lower cost)."""
    return best is None or row_key(row, metric) > row_key(best, metric)


def best_row(rows: Sequence[dict], metric: str) -> dict:
    best = None
    for row in rows:
        best = row if improves(row, best, metric) else best
    return best


@dataclass(frozen=True)
class Tie:
    """The candidates that scored the chosen one's metric exactly, and what chose among them."""

    tied: list  # the other candidates' labels (epochs, trial numbers, configurations)
    broken_by: str  # "val_loss", "val_accuracy", "the earlier epoch", "fewer epochs", "the lower trial number"

    def to_dict(self) -> dict:
        return {"tied": list(self.tied), "broken_by": self.broken_by}

    def words(self, what: str) -> str:
        """ "a tie with epochs 1, 3 on val_accuracy, broken by val_loss" """
        return f"a tie with {what} {', '.join(map(str, self.tied))}, broken by {self.broken_by}"


def epoch_tie(history: Sequence[dict], metric: str) -> Tie | None:
    """Whether a run's best epoch tied others on the metric, and what broke the tie."""
    best = best_row(history, metric)
    same = [r for r in history if r is not best and r.get(metric) == best.get(metric)]
    if not same:
        return None
    second = secondary_metric(metric)
    decided = all(row_key(r, metric) != row_key(best, metric) for r in same)
    return Tie([r["epoch"] for r in same], second if decided else "the earlier epoch")


def choose(candidates: Sequence[Any], keys: Sequence[tuple[str, Callable[[Any], float]]]) -> tuple[Any, str | None]:
    """The candidate with the largest key, compared key by key (each a name and a value to maximise), and the name of
    the first key that separated it from a candidate tied with it on the first key (None: no tie)."""
    values = [tuple(f(c) for _, f in keys) for c in candidates]
    top = max(range(len(candidates)), key=lambda i: values[i])
    tied = [i for i in range(len(candidates)) if i != top and values[i][0] == values[top][0]]
    if not tied:
        return candidates[top], None
    depth = min(next((k for k in range(len(keys)) if values[i][k] != values[top][k]), len(keys) - 1) for i in tied)
    return candidates[top], keys[depth][0]


def _value(trial) -> float:
    return trial.value


def _best(trial) -> dict:
    return trial.best or {}


def trial_keys(metric: str) -> list[tuple[str, Callable]]:
    """How trials rank: the metric, validation loss at their best epoch, fewer epochs, the lower trial number."""
    higher, second = higher_is_better(metric), secondary_metric(metric)
    return [
        (metric, lambda t: _signed(_value(t), higher)),
        (second, lambda t: _signed(_best(t).get(second), higher_is_better(second))),
        ("fewer epochs", lambda t: -len(t.history or [])),
        ("the lower trial number", lambda t: -t.number),
    ]


def best_trial(trials: Sequence[Any], metric: str) -> tuple[Any, Tie | None]:
    """The best trial (study.records.TrialRecord or alike: number, value, best, history) and its tie."""
    keys = trial_keys(metric)
    chosen, broken_by = choose(trials, keys)
    if broken_by is None:
        return chosen, None
    tied = [t.number for t in trials if t is not chosen and keys[0][1](t) == keys[0][1](chosen)]
    return chosen, Tie(tied, broken_by)


def best_group(groups: Sequence[list], metric: str, label: Callable[[list], str]) -> tuple[list, Tie | None]:
    """The best group of trials (a configuration's replicates) by its mean metric, then its mean tie-break metric,
    fewer epochs, its first trial number; with the tie, the other groups named by `label`."""
    higher, second = higher_is_better(metric), secondary_metric(metric)

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    keys = [
        (metric, lambda g: _signed(mean([_value(t) for t in g]), higher)),
        (second, lambda g: _signed(mean([_best(t).get(second) for t in g]), higher_is_better(second))),
        ("fewer epochs", lambda g: -max(len(t.history or []) for t in g)),
        ("the lower trial number", lambda g: -min(t.number for t in g)),
    ]
    chosen, broken_by = choose(groups, keys)
    if broken_by is None:
        return chosen, None
    tied = [label(g) for g in groups if g is not chosen and keys[0][1](g) == keys[0][1](chosen)]
    return chosen, Tie(tied, broken_by)
