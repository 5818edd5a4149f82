"""The report's statements of uncertainty.

The uncertainty a report states is right for 1, 2 and 3 replicates and for folds (what the interval covers; no
interval below 3 replicates); no digit is finer than its interval anywhere; a test interval that reaches chance is a
warning; a selection its replicates cannot tell from another is called a tie; paths in "Use this model" are
relative.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transferlab.report.data import StudyData
from transferlab.report.sections import selection_certainty
from transferlab.report.write import build_blocks, render_markdown
from transferlab.study.records import Selection, StudyRecord, TrialRecord


def markdown(data: StudyData, tmp_path: Path) -> str:
    return render_markdown(build_blocks(data), tmp_path)


def trial(number: int, strategy: str, accuracy: float, seed: int | None = None, n_val: int = 200) -> dict:
    row = {"epoch": 1, "seconds": 1.0, "val_accuracy": accuracy, "train_accuracy": accuracy, "val_loss": 1 - accuracy,
           "train_loss": 1 - accuracy}  # fmt: skip
    point = {"strategy": strategy, "epochs": 1, **({"seed": seed} if seed is not None else {})}
    return {"number": number, "kind": "run", "key": f"t{number}", "point": point, "history": [row], "best": row,
            "wall_seconds": 1.0, "config": {"batch_size": 8, "loss": "ce", "data": "cifar10", **point},
            "input_path": "images", "run_dir": "", "checkpoint": "", "source_trial": None, "setup_seconds": 0.1,
            "feature_seconds": 0.0, "n_val": n_val, "n_train": 800, "identity": f"id{number}"}  # fmt: skip


def selected(t, *, n_test: int = 2000, correct: int = 1500, counts=None, configuration=None) -> Selection:
    t = t if isinstance(t, dict) else dataclasses.asdict(t)
    classes = ["a", "b"]
    counts = counts or {"train": {"a": 400, "b": 400}, "val": {"a": 100, "b": 100},
                        "test": {"a": n_test // 2, "b": n_test - n_test // 2}}  # fmt: skip
    record = {"trial": t["number"], "key": t["key"], "identity": t["identity"], "point": t["point"],
              "val_accuracy": t["best"]["val_accuracy"], "val_loss": t["best"]["val_loss"], "metric": "val_accuracy",
              "n_val": t["n_val"], "test_accuracy": correct / n_test, "n_test": n_test, "test_loss": 0.5,
              "per_class_accuracy": {"a": 0.5, "b": 0.5}, "confusion_matrix": [[1, 1], [1, 1]], "classes": classes,
              "class_counts": counts, "tie": None}  # fmt: skip
    if configuration:
        record["configuration"] = configuration
    return Selection(**record)


def study(trials: list[dict], grid: dict, test: dict) -> StudyData:
    """A study's report data built by hand: trials and selection as the records the storage holds."""
    return StudyData("hand", {"name": "hand", "grid": grid}, "transferlab study run x.toml",
                     [TrialRecord(**t) for t in trials], grid, test, 1, {})  # fmt: skip


def replicated(values: dict[str, list[float]], axis: str = "seed") -> StudyData:
    trials, number = [], 0
    for strategy, accuracies in values.items():
        for seed, accuracy in enumerate(accuracies):
            t = trial(number, strategy, accuracy)
            t["point"] = {"strategy": strategy, "epochs": 1, axis: seed}
            trials.append(t)
            number += 1
    n = len(next(iter(values.values())))
    grid = {"strategy": list(values), "epochs": [1], axis: list(range(n))}
    best = max(values, key=lambda s: sum(values[s]))
    chosen = next(t for t in trials if t["point"]["strategy"] == best)
    configuration = {"key": f"epochs=1,strategy={best}", "replicate_axes": [axis], "mean": 0.0,
                     "trials": [t["number"] for t in trials if t["point"]["strategy"] == best]}  # fmt: skip
    return study(trials, grid, selected(chosen, configuration=configuration))


# ---------------------------------------------------------------------------- the report's statements
def test_a_test_interval_that_reaches_chance_is_a_warning(tmp_path):
    t = trial(0, "frozen", 0.6)
    weak = study([t], {"strategy": ["frozen"], "epochs": [1]}, selected(t, n_test=20, correct=12))
    text = markdown(weak, tmp_path)
    assert "Warning: the test accuracy's 95% interval" in text and "reaches down to chance, 50%" in text
    assert "too few to tell models a few points apart" in text
    strong = study([t], {"strategy": ["frozen"], "epochs": [1]}, selected(t, n_test=2000, correct=1500))
    assert "Warning" not in markdown(strong, tmp_path)
    imbalanced = selected(t, n_test=100, correct=85, counts={"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1},
                                                              "test": {"a": 90, "b": 10}})  # fmt: skip
    assert "chance, 90%" in markdown(study([t], {"strategy": ["frozen"], "epochs": [1]}, imbalanced), tmp_path)


def test_no_digit_finer_than_the_interval_anywhere(tmp_path):
    tiny = trial(0, "frozen", 1.0, n_val=2)
    text = markdown(study([tiny], {"strategy": ["frozen"], "epochs": [1]}, selected(tiny, n_test=2, correct=2)),
                    tmp_path)  # fmt: skip
    assert "100.00%" not in text and "| validation accuracy (best epoch) | 100% |" in text
    assert "| frozen | 100% |" in text and "test accuracy 100% (95% CI 34-100)" in text  # 2 of 2: ± 66 points
    two_hundred = trial(0, "frozen", 0.625, n_val=200)
    text = markdown(study([two_hundred], {"strategy": ["frozen"], "epochs": [1]}, selected(two_hundred)), tmp_path)
    assert "62.50%" not in text and "62.5%" not in text and "| frozen | 62% |" in text  # ± 7 points: whole points


def test_uncertainty_statements_for_one_two_and_three_replicates_and_folds(tmp_path):
    one = study([trial(0, "frozen", 0.6), trial(1, "full", 0.7)], {"strategy": ["frozen", "full"], "epochs": [1]},
                None)  # fmt: skip
    one.test = selected(one.trials[1])
    assert "Each configuration ran once" in selection_certainty(one)
    # two seeds whose differences agree exactly: no "± 0", no interval, a coin flip
    two = replicated({"frozen": [0.5, 0.6], "full": [0.6, 0.7]})
    text = markdown(two, tmp_path)
    assert "± 0.0 " not in text and "cannot be measured from 2 replicates" in text
    assert "coin flip" in selection_certainty(two) and "seeds on one fixed split" in text
    # three seeds, clearly apart: an interval, measurable, no coin flip
    three = replicated({"frozen": [0.50, 0.52, 0.51], "full": [0.70, 0.71, 0.72]})
    text = markdown(three, tmp_path)
    assert "full beats frozen by" in text and "coin flip" not in selection_certainty(three)
    # three seeds within each other's noise: the table says so and the selection says it was a coin flip
    close = replicated({"frozen": [0.50, 0.70, 0.60], "full": [0.62, 0.58, 0.63]})
    assert "no measurable difference" in markdown(close, tmp_path) and "coin flip" in selection_certainty(close)
    folds = replicated({"frozen": [0.50, 0.52, 0.51], "full": [0.70, 0.71, 0.72]}, axis="fold")
    text = markdown(folds, tmp_path)
    assert "cross-validation folds" in text and "seeds on one fixed split" not in text


def test_a_tied_selection_says_so(tmp_path):
    a, b = trial(0, "frozen", 0.6), trial(1, "full", 0.6)
    record = selected(a)
    record.tie = {"tied": [1], "broken_by": "val_loss"}
    text = markdown(study([a, b], {"strategy": ["frozen", "full"], "epochs": [1]}, record), tmp_path)
    assert "The selection was a tie on val_accuracy with trials 1, broken by val_loss." in text


def test_use_this_model_shows_no_absolute_path_of_this_machine(tmp_path):
    t = trial(0, "frozen", 0.6)
    t["checkpoint"] = "trials/x/best.pt"
    t["config"]["data"] = "../shared/images"
    data = study([t], {"strategy": ["frozen"], "epochs": [1]}, selected(t))
    data.directory = tmp_path / "project" / "studies-out" / "s"
    data.record = StudyRecord(cwd=str(tmp_path / "project"))
    box = markdown(data, tmp_path).split("### Use this model")[1].split("\n## ")[0]
    assert str(tmp_path) not in box
    assert "transferlab predict trials/x/best.pt images/" in box
    assert "--data ../../../shared/images" in box  # the spec's path, seen from the study directory
