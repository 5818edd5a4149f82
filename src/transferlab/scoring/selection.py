"""Which is best: one rule for a run's best epoch, a study's best trial and its best configuration, ties included.

The selection metric decides (its direction from `config.higher_is_better`). A tie on it is broken by validation loss
(lower wins; by validation accuracy when the metric is the loss itself), then by the lower cost: the earlier epoch,
the trial of fewer epochs, then the lower trial number. Every choice that needed a tie-break says so (`Tie`: which
candidates tied, and which breaker separated each of them), and the report and metrics.json repeat it: a selection
that was a tie was not decided by the metric.
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
    """The candidates that scored the chosen one's metric exactly, and what chose among them, breaker by breaker.

    `steps` pairs each breaker that was needed, in the order the breakers apply, with the candidates it separated
    from the chosen one: epochs 1-4 tied on val_accuracy, epoch 3 chosen, 1 and 2 lost on val_loss and 4 tied on it
    too and lost as the later epoch is ((val_loss, [1, 2]), (the earlier epoch, [4])). `broken_by` is the last of
    them: what finally chose. A tie one breaker broke has one step, and is recorded as before steps existed."""

    tied: list  # the other candidates' labels (epochs, trial numbers, configurations)
    broken_by: str  # "val_loss", "val_accuracy", "the earlier epoch", "fewer epochs", "the lower trial number"
    steps: tuple = ()  # ((breaker, [labels it separated]), ...); () means one step: (broken_by, tied)

    def stages(self) -> list[tuple[str, list]]:
        """Each breaker needed and the candidates it separated from the chosen one, in order."""
        return [(b, list(labels)) for b, labels in self.steps] or [(self.broken_by, list(self.tied))]

    def to_dict(self) -> dict:
        """{"tied", "broken_by"} as always, and "steps" ([{"broken_by", "tied"}, ...]) when more than one breaker was
        needed (readers of the two keys alone keep working; Tie.from_dict reads both forms)."""
        out = {"tied": list(self.tied), "broken_by": self.broken_by}
        if len(self.stages()) > 1:
            out["steps"] = [{"broken_by": b, "tied": labels} for b, labels in self.stages()]
        return out

    @classmethod
    def from_dict(cls, values: dict) -> Tie:
        steps = tuple((s["broken_by"], list(s["tied"])) for s in values.get("steps") or ())
        return cls(list(values["tied"]), values["broken_by"], steps if len(steps) > 1 else ())

    def words(self, what: str = "", metric: str = "") -> str:
        """ "a tie with epochs 1, 3, broken by val_loss"; when it took two breakers, which candidates each separated:
        "a tie with epochs 1, 2, 4, broken by val_loss (1, 2), then by the earlier epoch (4)". `metric`: "a tie on
        val_accuracy with ..." """
        on = f" on {metric}" if metric else ""
        labels = f"{what} {_listed(self.tied)}" if what else _listed(self.tied)
        stages = self.stages()
        if len(stages) == 1:
            return f"a tie{on} with {labels}, broken by {self.broken_by}"
        broken = ", then by ".join(f"{b} ({_listed(them)})" for b, them in stages)
        return f"a tie{on} with {labels}, broken by {broken}"


def _listed(labels) -> str:
    return ", ".join(map(str, labels))


def _tie(labels: list, breakers: list[str], order: Sequence[str]) -> Tie:
    """The Tie of the candidates `labels`, each separated from the chosen one by the breaker of the same index, its
    steps in `order` (the order the breakers apply)."""
    steps = tuple((b, [label for label, by in zip(labels, breakers) if by == b]) for b in order if b in breakers)
    return Tie(labels, steps[-1][0], steps if len(steps) > 1 else ())


def epoch_tie(history: Sequence[dict], metric: str) -> Tie | None:
    """Whether a run's best epoch tied others on the metric, and what separated each of them from it: the tie-break
    metric (they lost on it), else the earlier epoch (they tied on it too)."""
    best = best_row(history, metric)
    same = [r for r in history if r is not best and r.get(metric) == best.get(metric)]
    if not same:
        return None
    second, chosen = secondary_metric(metric), row_key(best, metric)
    breakers = [second if row_key(r, metric) != chosen else "the earlier epoch" for r in same]
    return _tie([r["epoch"] for r in same], breakers, (second, "the earlier epoch"))


def choose(candidates: Sequence[Any], keys: Sequence[tuple[str, Callable[[Any], float]]], label: Callable[[Any], Any]
           ) -> tuple[Any, Tie | None]:  # fmt: skip
    """The candidate with the largest key, compared key by key (each a name and a value to maximise), and its Tie with
    the candidates equal to it on the first key (labelled by `label`): each separated by the first key on which it
    differs from the chosen one (None: no tie)."""
    values = [tuple(f(c) for _, f in keys) for c in candidates]
    top = max(range(len(candidates)), key=lambda i: values[i])
    tied = [i for i in range(len(candidates)) if i != top and values[i][0] == values[top][0]]
    if not tied:
        return candidates[top], None
    depths = [next((k for k in range(1, len(keys)) if values[i][k] != values[top][k]), len(keys) - 1) for i in tied]
    names = [name for name, _ in keys]
    return candidates[top], _tie([label(candidates[i]) for i in tied], [names[d] for d in depths], names)


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
    return choose(trials, trial_keys(metric), lambda t: t.number)


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
    return choose(groups, keys, label)
