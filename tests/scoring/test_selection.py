"""Ties: an epoch or trial that ties on the metric is chosen by validation loss, then the lower cost (fewer
epochs, the lower trial number), and the choice says it was a tie.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from transferlab.engine.rundir import RunResult
from transferlab.report.format import _best_epoch, tie_words
from transferlab.scoring.selection import Tie, best_group, best_trial, epoch_tie, improves


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


# ---------------------------------------------------------------------------- found by a hostile tester
def test_a_tie_broken_in_two_steps_says_which_epochs_each_breaker_separated():
    rows = [{"epoch": e, "val_accuracy": 0.5, "val_loss": loss} for e, loss in ((1, 0.9), (2, 0.8), (3, 0.2), (4, 0.2))]
    assert best_row_epoch(rows, "val_accuracy") == 3
    tie = epoch_tie(rows, "val_accuracy")
    assert tie.tied == [1, 2, 4] and tie.broken_by == "the earlier epoch"  # what finally chose
    assert tie.stages() == [("val_loss", [1, 2]), ("the earlier epoch", [4])]
    words = "a tie with epochs 1, 2, 4, broken by val_loss (1, 2), then by the earlier epoch (4)"
    assert tie.words("epochs") == words
    stored = tie.to_dict()  # the two keys readers have always read, and the steps
    assert stored == {"tied": [1, 2, 4], "broken_by": "the earlier epoch",
                      "steps": [{"broken_by": "val_loss", "tied": [1, 2]},
                                {"broken_by": "the earlier epoch", "tied": [4]}]}  # fmt: skip
    assert Tie.from_dict(stored) == tie
    # where it is printed: a run's summary line, the report's best epoch
    result = RunResult(Path("run"), rows, 3, "val_accuracy", "cached", n_val=10)
    assert f"best epoch 3 (by val_accuracy; {words}): " in result.summary()
    assert result.at_epoch(4)["tie"] == stored
    trial = SimpleNamespace(best={"epoch": 3}, best_epoch_tie=stored)
    assert _best_epoch(trial) == "3 (a tie with 1, 2, 4, broken by val_loss (1, 2), then by the earlier epoch (4))"


def test_a_tie_one_breaker_broke_reads_and_is_stored_as_before():
    rows = [{"epoch": e, "val_accuracy": 0.5, "val_loss": loss} for e, loss in ((1, 0.9), (2, 0.2), (3, 0.8))]
    tie = epoch_tie(rows, "val_accuracy")
    assert tie.to_dict() == {"tied": [1, 3], "broken_by": "val_loss"}
    assert tie.words("epochs") == "a tie with epochs 1, 3, broken by val_loss"
    old = {"tied": [1], "broken_by": "val_loss"}  # a record written before steps existed
    words = "a tie on val_accuracy with trials 1, broken by val_loss"
    assert Tie.from_dict(old).words("trials", "val_accuracy") == words
    assert tie_words(SimpleNamespace(tie=old, configuration=None, metric="val_accuracy")) == words


def test_a_trial_or_configuration_tie_broken_in_two_steps_says_which_each_breaker_separated():
    trials = [fake(0, 0.8, 0.9, 3), fake(1, 0.8, 0.4, 5), fake(2, 0.8, 0.4, 2), fake(3, 0.7, 0.1, 1)]
    chosen, tie = best_trial(trials, "val_accuracy")
    assert chosen.number == 2 and tie.tied == [0, 1] and tie.broken_by == "fewer epochs"
    assert tie.stages() == [("val_loss", [0]), ("fewer epochs", [1])]
    assert tie.words("trials", "val_accuracy") == (
        "a tie on val_accuracy with trials 0, 1, broken by val_loss (0), then by fewer epochs (1)"
    )
    selection = SimpleNamespace(tie=tie.to_dict(), configuration=None, metric="val_accuracy")
    assert tie_words(selection) == tie.words("trials", "val_accuracy")
    chosen, tie = best_trial([fake(5, 0.8, 0.4, 2), fake(4, 0.8, 0.4, 2), fake(0, 0.8, 0.4, 3)], "val_accuracy")
    assert chosen.number == 4 and tie.stages() == [("fewer epochs", [0]), ("the lower trial number", [5])]
    groups = [[fake(0, 0.8, 0.9, 2), fake(1, 0.8, 0.9, 2)], [fake(2, 0.8, 0.4, 2), fake(3, 0.8, 0.4, 2)],
              [fake(4, 0.8, 0.4, 2), fake(5, 0.8, 0.4, 2)]]  # fmt: skip
    chosen, tie = best_group(groups, "val_accuracy", lambda g: f"lr = {g[0].number}")
    assert chosen is groups[1] and tie.tied == ["lr = 0", "lr = 4"]
    assert tie.stages() == [("val_loss", ["lr = 0"]), ("the lower trial number", ["lr = 4"])]
