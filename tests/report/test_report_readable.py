"""The report's summary, time, figures and Reproduce block hold for any study shape and say only what is stored.

- Summary: regime x epochs in percent, equal to the stored best validation accuracies; the selected trial;
  "use this model" commands that name the selected checkpoint.
- Time: each trained epoch counted once (derived trials are prefixes of their run); one-off work apart.
- Figures: none drawn on an axis with a single value; many variants -> one sorted dot chart.
- Reproduce: the spec as TOML that parses back to the recorded spec with absolute paths and runs again.
"""

from __future__ import annotations

import math
import re
import shlex
import statistics
import tomllib
from pathlib import Path

import pytest
from helpers import load_study, section, study_tree, tables_in, write_spec

from transferlab import __version__
from transferlab.report.data import StudyData
from transferlab.report.figures import accuracy_vs_epochs, learning_curves, timing_plot, variant_chart
from transferlab.report.load import load_study_data
from transferlab.report.reproduce import to_toml
from transferlab.report.tables import time_table
from transferlab.report.write import build_blocks, render_markdown
from transferlab.scoring.stats import percent, percent_with_interval
from transferlab.study.records import StudyRecord, TrialRecord, grid_trials
from transferlab.study.runner import run_study


# ---------------------------------------------------------------------------- a tiny study, run once
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tree = study_tree(root / "images")
    spec_path = write_spec(
        root / "tiny.toml",
        tree,
        root / "cache",
        {"strategy": ["full", "frozen"], "batch_size": [8], "epochs": [1, 2]},
        name="tiny",
        head="linear",
        lr=0.01,
    )
    directory = run_study(spec_path, study_dir=root / "out", report=True)
    return root, directory, (directory / "report.md").read_text()


def test_summary_table_is_the_stored_best_validation_accuracy_in_percent(tiny):
    _, directory, text = tiny
    ((_, rows),) = tables_in(section(text, "Summary"))
    assert rows[0] == ["regime", "1 epochs", "2 epochs"]
    assert [r[0] for r in rows[1:]] == ["frozen", "full"]  # the fixed order, not the grid's
    for t in grid_trials(load_study(directory)):
        point = t.point
        row = next(r for r in rows if r[0] == point["strategy"])
        cell = row[1 + [1, 2].index(point["epochs"])]
        n = t.n_val  # the precision its validation images allow; one setting per cell: no brackets
        assert cell == percent(round(t.best["val_accuracy"] * n), n)


def test_summary_names_the_selected_trial_and_its_test_accuracy(tiny):
    _, directory, text = tiny
    selected = StudyRecord.of(load_study(directory)).selected
    summary = section(text, "Summary")
    assert f"trial {selected['trial']} ({selected['key']})" in summary
    n_val = selected["n_val"]
    assert f"validation accuracy {percent(round(selected['val_accuracy'] * n_val), n_val)}" in summary
    n = selected["n_test"]
    shown = percent_with_interval(round(selected["test_accuracy"] * n), n)  # with its Wilson interval
    assert f"test accuracy {shown} on {n} test images" in summary and "Wilson score interval" in summary


def test_use_this_model_commands_name_the_selected_checkpoint(tiny):
    _, directory, text = tiny
    study = load_study(directory)
    selected = StudyRecord.of(study).selected
    trial = next(t for t in grid_trials(study) if t.number == selected["trial"])
    checkpoint = (directory / trial.checkpoint).resolve()
    box = section(text, "Summary").split("### Use this model")[1]
    assert str(checkpoint) not in box and trial.checkpoint in box  # relative: no machine's folders
    (commands,) = re.findall(r"```\n(.*?)\n```", box, flags=re.S)
    lines = [shlex.split(line) for line in commands.splitlines()]
    assert [line[:2] for line in lines] == [
        ["transferlab", "predict"],
        ["transferlab", "evaluate"],
        ["transferlab", "export"],
    ]
    for line in lines:  # run from the study directory
        assert not Path(line[2]).is_absolute() and (directory / line[2]).resolve() == checkpoint
    data = lines[1][lines[1].index("--data") + 1]
    recorded = trial.config["data"]  # the spec's own path: absolute stays as given, relative is moved
    assert data == recorded if Path(recorded).is_absolute() else (directory / data).resolve().is_dir()
    assert lines[2][3:] == ["--format", "onnx", "-o", "model.onnx"]


def test_reproduce_toml_parses_back_to_the_spec_with_absolute_paths_and_runs(tiny):
    root, directory, text = tiny
    reproduce = section(text, "Reproduce")
    blocks = re.findall(r"```\n(.*?)\n```", reproduce, flags=re.S)
    spec = tomllib.loads(blocks[1])
    recorded = StudyRecord.of(load_study(directory)).spec
    assert spec["grid"] == recorded["grid"] and spec["name"] == "tiny"
    for key in ("data", "cache_dir"):
        assert Path(spec["run"][key]).is_absolute() and Path(spec["run"][key]) == Path(recorded["run"][key]).resolve()
    assert {k: v for k, v in spec["run"].items() if k not in ("data", "cache_dir")} == {
        k: v for k, v in recorded["run"].items() if k not in ("data", "cache_dir")
    }
    rows = dict(tables_in(reproduce)[0][1][1:])
    assert rows["transferlab that wrote this report"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*", rows["report written"])
    assert rows["data fingerprint"].startswith("folder-")
    assert "its git commit" in rows or "transferlab that ran the study" in rows
    # printed as is, from another directory, it trains again (same cache: fast) and reports
    path = root / "elsewhere" / "spec.toml"
    path.parent.mkdir()
    path.write_text(blocks[1] + "\n")
    again = run_study(path, study_dir=root / "elsewhere" / "out", report=True)
    assert len(grid_trials(load_study(again))) == 4


def test_one_off_time_is_recorded_apart_from_epochs(tiny):
    _, directory, text = tiny
    study = load_study(directory)
    runs = [t for t in grid_trials(study) if t.kind == "run"]
    for t in runs:
        assert 0 <= t.feature_seconds <= t.setup_seconds < t.wall_seconds
        metrics = (directory / t.run_dir / "metrics.json").read_text()
        assert '"setup_seconds"' in metrics and '"feature_seconds"' in metrics
    frozen = next(t for t in runs if t.point["strategy"] == "frozen")
    assert frozen.feature_seconds > 0  # the frozen run computed its feature cache
    last = StudyRecord.of(study).last_run
    assert last["wall_seconds"] > sum(t.wall_seconds for t in runs)
    assert StudyRecord.of(study).selected["test_seconds"] >= 0
    time_text = section(text, "Time")
    epochs = sum(len(t.history) for t in runs)
    assert f"{len(runs)} runs trained {epochs} epochs in all" in time_text
    assert f"from {last['started']} to {last['finished']}" in time_text


# ---------------------------------------------------------------------------- studies built by hand
def trial(number, strategy, seconds, *, kind="run", epochs=None, source=None, loss="ce", **point):
    accuracy = [0.5 + 0.01 * i for i in range(len(seconds))]
    history = [
        {"epoch": i + 1, "seconds": s, "val_accuracy": a, "train_accuracy": a + 0.05, "val_loss": 1 - a,
         "train_loss": 0.9 - a}
        for i, (s, a) in enumerate(zip(seconds, accuracy))
    ]  # fmt: skip
    point = {"strategy": strategy, "epochs": epochs or len(seconds), **point}
    return TrialRecord(**{
        "number": number,
        "kind": kind,
        "key": ",".join(f"{k}={v}" for k, v in sorted(point.items())),
        "point": point,
        "history": history,
        "best": history[-1],
        "wall_seconds": sum(seconds) + 1,
        "config": {"batch_size": 8, "loss": loss, "data": "/data", **point},
        "input_path": "images",
        "run_dir": "",
        "checkpoint": "",
        "source_trial": source,
        "setup_seconds": 0.5 if kind == "run" else None,
        "feature_seconds": 0.25 if kind == "run" else None,
    })  # fmt: skip


def study_of(trials, grid) -> StudyData:
    """A study's report data built by hand: trials as the records the storage holds."""
    return StudyData("hand", {"name": "hand", "grid": grid}, "transferlab study run x.toml",
                     trials, grid, None, 0, {})  # fmt: skip


def test_derived_epochs_are_not_counted_again_in_the_time_table(tmp_path):
    trials = [
        trial(0, "frozen", [1.0, 2.0, 3.0]),
        trial(1, "frozen", [1.0], kind="derived", source=0),
        trial(2, "frozen", [1.0, 2.0], kind="derived", source=0),
    ]
    data = study_of(trials, {"strategy": ["frozen"], "epochs": [1, 2, 3]})
    table, times = time_table(data)
    ((key, cell),) = times.items()
    assert key == ("frozen", "") and cell == {"epochs": 3, "training": 6.0, "per_epoch": 2.0}
    assert table.rows[1] == ["frozen", "-", "1", "3", "2.00", "6.00", "0.50", "0.25"]
    text = render_markdown(build_blocks(data), tmp_path)
    assert "1 runs trained 3 epochs in all: 6.00 s of training" in text
    all_trials = section(text, "All trials")
    assert all_trials.count("in run 0") == 4  # the derived trials' s/epoch and total s: their run's


def test_single_value_axes_draw_no_figure(tmp_path):
    data = study_of(
        [trial(0, "frozen", [1.0], batch_size=8)], {"strategy": ["frozen"], "batch_size": [8], "epochs": [1]}
    )
    assert learning_curves(data) is None  # one epoch: a dot, not a curve
    assert accuracy_vs_epochs(data) is None  # one epoch budget
    assert timing_plot(data, time_table(data)[1]) is None  # one bar
    blocks = build_blocks(data)
    assert not [b for b in blocks if b.kind == "figure"]
    render_markdown(blocks, tmp_path)
    assert not list(tmp_path.iterdir())


def test_many_variants_become_one_sorted_dot_chart():
    variants = [f"v{i:02d}" for i in range(18)]
    trials = [
        trial(i * 2 + j, strategy, [1.0] * (1 + i % 3), epochs=3, variant=v)
        for i, v in enumerate(variants)
        for j, strategy in enumerate(("full", "frozen"))
    ]
    data = study_of(trials, {"strategy": ["full", "frozen"], "variant": variants, "epochs": [3]})
    assert variant_chart(data).startswith(b"\x89PNG")
    assert accuracy_vs_epochs(data) is None  # one epoch budget
    blocks = build_blocks(data)
    captions = [b.text for b in blocks if b.kind == "figure"]
    assert "Each variant against v00, per regime (sorted)" in captions
    (variants_table,) = [b for b in blocks if b.kind == "table" and b.rows[0][0] == "variant"]
    assert variants_table.rows[0] == ["variant", "frozen", "full"]


def test_ce_and_mse_losses_get_their_own_rows(monkeypatch):
    from transferlab.report import figures

    made = []
    original = figures._subplots

    def spy(*args, **kwargs):
        made.append(args)
        return original(*args, **kwargs)

    trials = [trial(0, "frozen", [1.0, 1.0], loss="ce"), trial(1, "full", [1.0, 1.0], loss="mse")]
    data = study_of(trials, {"strategy": ["frozen", "full"], "epochs": [2]})
    monkeypatch.setattr(figures, "_subplots", spy)
    assert learning_curves(data)
    assert made == [(3, 2)]  # accuracy, ce loss, mse loss x two regimes


def test_toml_writer_round_trips_the_spec_tree():
    tree = {
        "name": 'quote " and \\ and ü',
        "metric": "val_accuracy",
        "run": {"data": "/a b/c", "lr": 1e-05, "flip": True, "epochs": 3, "labels": None, "big": math.inf},
        "grid": {"strategy": ["frozen", "full"], "lr": [0.1, 0.01], "flip": [True, False]},
        "variants": {"baseline": {}, "flipped": {"flip": True, "dropout": 0.25}},
    }
    back = tomllib.loads(to_toml(tree))
    expected = {**tree, "run": {k: v for k, v in tree["run"].items() if v is not None}}
    assert back == expected


def test_seed_spread_in_the_summary_is_averaged():
    trials = [trial(i, "frozen", [1.0], seed=i) for i in range(2)]
    trials[1].best = {**trials[1].best, "val_accuracy": 0.51}
    data = study_of(trials, {"strategy": ["frozen"], "epochs": [1], "seed": [0, 1]})
    (summary,) = [b for b in build_blocks(data) if b.kind == "table" and b.rows[0][0] == "regime"][:1]
    mean, std = 100 * statistics.mean([0.5, 0.51]), 100 * statistics.stdev([0.5, 0.51])
    # n_val not recorded (trials from before it was): one decimal, the spread (0.7 points) allows it
    assert summary.rows[1] == ["frozen", f"{mean:.1f} ± {std:.1f}%, n = 2"] == ["frozen", "50.5 ± 0.7%, n = 2"]
    for t in trials:
        t.n_val = 200  # 50% of 200 images: the Wilson interval is about 7 points either way, so whole points
    (summary,) = [b for b in build_blocks(data) if b.kind == "table" and b.rows[0][0] == "regime"][:1]
    assert summary.rows[1] == ["frozen", "50 ± 1%, n = 2"]


def test_load_study_data_reads_the_new_time_attributes(tiny):
    _, directory, _ = tiny
    data = load_study_data(directory)
    assert data.record.last_run["wall_seconds"] > 0 and data.record.cwd
    assert all(t.setup_seconds is not None for t in data.trials if t.kind == "run")
