"""Metrics: their direction, their exact values and how they are printed.

- `improves` follows each metric's direction (val_loss: lower is better).
- Accuracy is the exact fraction correct; no percentage reads 100% or 0% when it is not.
"""

from __future__ import annotations

import torch

from transferlab.scoring.selection import improves


# ---------------------------------------------------------------------------- the selection metric
def test_improves_follows_the_metric():
    a, b = {"val_accuracy": 0.5, "val_loss": 1.0}, {"val_accuracy": 0.6, "val_loss": 1.2}
    assert improves(b, a, "val_accuracy") and not improves(b, a, "val_loss")
    assert improves(a, b, "val_loss") and not improves(a, a, "val_loss")  # a tie keeps the earlier epoch


# ---------------------------------------------------------------------------- bad files
def test_accuracy_is_the_exact_fraction_correct():
    from transferlab.scoring.metrics import scores

    probs = torch.eye(3)[[0, 1, 2, 0, 0, 1, 2, 2, 1, 0] * 20]  # 200 images
    y = torch.tensor([0, 1, 2, 1, 0, 1, 2, 0, 1, 0] * 20)  # 8 of 10 right
    result = scores(probs.log()[None], y, ["a", "b", "c"], loss="ce", label_smoothing=0.0)
    assert result["accuracy"] == 160 / 200 == 0.8


# ---------------------------------------------------------------------------- found by a hostile tester
def test_no_percentage_reads_100_or_0_when_it_is_not():
    from transferlab.scoring.stats import percent, percent_with_interval

    assert percent(99999, 100000) == "99.999%" and percent_with_interval(99999, 100000).startswith("99.999% ")
    assert percent(1, 100000) == "0.001%" and percent(2, 2) == "100%" and percent(0, 7) == "0%"
