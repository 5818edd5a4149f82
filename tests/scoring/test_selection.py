"""Ties: an epoch or trial that ties on the metric is chosen by validation loss, then the lower cost (fewer
epochs, the lower trial number), and the choice says it was a tie.
"""

from __future__ import annotations

from types import SimpleNamespace

from transferlab.scoring.selection import best_trial, epoch_tie, improves


def best_row_epoch(rows, metric):
    best = None
    for row in rows:
        best = row if improves(row, best, metric) else best
    return best["epoch"]


def fake(number: int, value: float, loss: float, epochs: int):
    history = [{"epoch": e + 1} for e in range(epochs)]
    return SimpleNamespace(number=number, value=value, best={"val_loss": loss}, history=history)


# ---------------------------------------------------------------------------- ties
def test_an_accuracy_tie_between_epochs_goes_to_the_lower_validation_loss():
    rows = [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 0.9}, {"epoch": 5, "val_accuracy": 0.5, "val_loss": 0.0}]
    assert improves(rows[1], rows[0], "val_accuracy")
    tie = epoch_tie(rows, "val_accuracy")
    assert tie.tied == [1] and tie.broken_by == "val_loss"
    same = [{**rows[0]}, {**rows[0], "epoch": 2}]  # the same in every figure: the earlier, cheaper epoch
    assert not improves(same[1], same[0], "val_accuracy")
    assert epoch_tie(same, "val_accuracy").broken_by == "the earlier epoch"
    assert epoch_tie(rows[:1], "val_accuracy") is None
    by_loss = [{"epoch": 1, "val_accuracy": 0.4, "val_loss": 0.5}, {"epoch": 2, "val_accuracy": 0.6, "val_loss": 0.5}]
    assert epoch_tie(by_loss, "val_loss").broken_by == "val_accuracy" and best_row_epoch(by_loss, "val_loss") == 2


def test_a_trial_tie_goes_to_the_lower_loss_then_fewer_epochs_then_the_lower_number():
    chosen, tie = best_trial([fake(0, 0.8, 0.9, 3), fake(1, 0.8, 0.4, 3), fake(2, 0.7, 0.1, 1)], "val_accuracy")
    assert chosen.number == 1 and tie.tied == [0] and tie.broken_by == "val_loss"
    chosen, tie = best_trial([fake(0, 0.8, 0.4, 5), fake(1, 0.8, 0.4, 2)], "val_accuracy")
    assert chosen.number == 1 and tie.broken_by == "fewer epochs"
    chosen, tie = best_trial([fake(3, 0.8, 0.4, 2), fake(1, 0.8, 0.4, 2)], "val_accuracy")
    assert chosen.number == 1 and tie.broken_by == "the lower trial number"
    chosen, tie = best_trial([fake(0, 0.9, 0.4, 2), fake(1, 0.8, 0.1, 2)], "val_accuracy")
    assert chosen.number == 0 and tie is None  # the metric decided: no tie to report
    chosen, tie = best_trial([fake(0, 0.3, 0.3, 2), fake(1, 0.2, 0.2, 2)], "val_loss")  # loss: lower wins
    assert chosen.number == 1 and tie is None
