"""The selection metrics: what a run's per-epoch rows hold, which way is better and how each is printed.

One home for a metric's direction and kind: training picks the best epoch by it, a study its best trial, the report
formats it; none of them tests a metric by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    rate: bool  # a proportion of images (printed as a percentage at its interval's precision), else a loss
    tie_break: str  # the metric that decides between epochs or trials equal on this one


METRICS = {
    "val_accuracy": Metric("val_accuracy", True, True, "val_loss"),
    "val_loss": Metric("val_loss", False, False, "val_accuracy"),
    "val_balanced_accuracy": Metric("val_balanced_accuracy", True, True, "val_loss"),
    "val_macro_f1": Metric("val_macro_f1", True, True, "val_loss"),
}
DEFAULT_METRIC = "val_accuracy"


def metric(name: str) -> Metric:
    """The metric called `name`; the names of a run's rows that are no selection metric (val_loss's partner
    train_loss, a history row's train_accuracy) are read as their val_ counterpart's kind."""
    return METRICS.get(name) or METRICS["val_loss" if name.endswith("loss") else "val_accuracy"]


def higher_is_better(name: str) -> bool:
    return metric(name).higher_is_better
