"""The study report: every number in report.md's tables is the one stored in the Optuna storage.

The paper tables (one per regime and batch size, a column per epoch count) show each grid point's
last epoch, accuracies in percent and the gap in percentage points, each with no digit finer than its
uncertainty allows: the Wilson 95% interval of a proportion of that many validation (training) images,
and for seeds of one grid point (mean ± sample standard deviation) also their spread. Time is in its own
section (each trained epoch counted once), not in these tables.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    load_study,
    places,
    section,
    study_tree,
    tables_in,
    write_spec,
)

from transferlab.cli import main
from transferlab.config.study import StudySpec
from transferlab.scoring.stats import percent, percent_with_interval
from transferlab.study.records import grid_trials
from transferlab.study.runner import run_study

ROWS = {
    "val loss": "val_loss",
    "val accuracy": "val_accuracy",
    "train loss": "train_loss",
    "train accuracy": "train_accuracy",
    "gap (train - val accuracy)": "gap",
}


# ---------------------------------------------------------------------------- reading report.md back
def paper_tables(report: Path) -> dict[tuple, list[list[str]]]:
    """(strategy, caption) -> rows, from the 'Results per regime' section."""
    out = {}
    for heading, rows in tables_in(section(report.read_text(), "Results per regime")):
        assert heading.startswith("Regime: ")
        out[(heading.removeprefix("Regime: "), rows[0][0])] = rows
    return out


# ---------------------------------------------------------------------------- the expected cells, from the storage
def stored_trials(directory: Path) -> list[dict]:
    return [
        {
            "point": t.point,
            "history": t.history,
            "config": t.config,
            "number": t.number,
            "kind": t.kind,
            "n_val": t.n_val,
            "n_train": t.n_train,
        }
        for t in grid_trials(load_study(directory))
    ]


def cell_values(trials: list[dict], metric: str) -> list[float]:
    if metric == "gap":
        return [t["history"][-1]["train_accuracy"] - t["history"][-1]["val_accuracy"] for t in trials]
    return [t["history"][-1][metric] for t in trials]


def expected_cell(values: list[float], metric: str, trials: list[dict]) -> str:
    n_val, n_train = min(t["n_val"] for t in trials), min(t["n_train"] for t in trials)
    if metric == "gap":  # percentage points, at the validation accuracy's precision
        d = places(values, n_val, cell_values(trials, "val_accuracy"))
        if len(values) == 1:
            return f"{100 * values[0]:+.{d}f} pp"
        return f"{100 * statistics.mean(values):+.{d}f} ± {100 * statistics.stdev(values):.{d}f} pp"
    if metric.endswith("accuracy"):  # percent
        d = places(values, n_val if metric.startswith("val") else n_train, values)
        if len(values) == 1:
            return f"{100 * values[0]:.{d}f}%"
        return f"{100 * statistics.mean(values):.{d}f} ± {100 * statistics.stdev(values):.{d}f}%"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def check_paper_tables(directory: Path, spec: StudySpec, other_axes: tuple[str, ...] = ()) -> int:
    """Compare every cell of every paper table with the storage; returns the number of cells checked."""
    tables = paper_tables(directory / "report.md")
    trials = stored_trials(directory)

    def value(t, axis):
        return t["point"].get(axis, t["config"][axis])

    groups = {}
    for t in trials:
        extra = ", ".join(f"{a} = {value(t, a)}" for a in other_axes)
        caption = f"batch size {value(t, 'batch_size')}" + (f", {extra}" if extra else "")
        groups.setdefault((value(t, "strategy"), caption), []).append(t)
    assert set(tables) == set(groups)
    checked = 0
    for key, rows in tables.items():
        members = groups[key]
        epochs = sorted({value(t, "epochs") for t in members})
        assert rows[0][1:] == [f"{e} epochs" for e in epochs]
        assert [r[0] for r in rows[1:]] == list(ROWS)
        for row in rows[1:]:
            metric = ROWS[row[0]]
            for e, cell in zip(epochs, row[1:], strict=True):
                at = [t for t in members if value(t, "epochs") == e]
                assert cell == expected_cell(cell_values(at, metric), metric, at), (key, row[0], e)
                checked += 1
    return checked


# ---------------------------------------------------------------------------- studies
@pytest.fixture(scope="module")
def seeds_study(tmp_path_factory):
    """Two seeds per grid point: cells are mean ± std."""
    root = tmp_path_factory.mktemp("seeds")
    spec_path = write_spec(
        root / "seeds.toml",
        study_tree(root / "images"),
        root / "cache",
        {"strategy": ["frozen"], "batch_size": [8, 16], "epochs": [1, 2], "seed": [0, 1]},
        name="seeds",
        head="linear",
        lr=0.01,
    )
    return StudySpec.load(spec_path), run_study(spec_path, study_dir=root / "out", report=True)


@pytest.fixture(scope="module")
def axis_study(tmp_path_factory):
    """One seed, two regimes, and an axis the paper did not have (lr): one table per lr value."""
    root = tmp_path_factory.mktemp("axis")
    spec_path = write_spec(
        root / "axis.toml",
        study_tree(root / "images"),
        root / "cache",
        {"strategy": ["full", "frozen"], "batch_size": [16], "epochs": [1, 2], "lr": [0.001, 0.01]},
        name="axis",
    )
    return StudySpec.load(spec_path), run_study(spec_path, study_dir=root / "out", report=True)


def test_seed_cells_are_mean_and_sample_std_of_the_stored_trials(seeds_study):
    spec, directory = seeds_study
    assert check_paper_tables(directory, spec) == 2 * 2 * len(ROWS)  # 2 batch sizes x 2 epoch columns x rows
    tables = paper_tables(directory / "report.md")
    cells = [c for rows in tables.values() for r in rows[1:] for c in r[1:]]
    assert all(" ± " in c for c in cells)
    # the seeds differ somewhere, so the ± is not vacuous
    assert any(not c.endswith((" ± 0.0000", " ± 0%", " ± 0.0%", " ± 0 pp", " ± 0.0 pp")) for c in cells)


def test_one_seed_cells_are_the_stored_last_epoch_values(axis_study):
    spec, directory = axis_study
    assert check_paper_tables(directory, spec, other_axes=("lr",)) == 2 * 2 * 2 * len(ROWS)
    cells = [c for rows in paper_tables(directory / "report.md").values() for r in rows[1:] for c in r[1:]]
    assert cells and not any("±" in c for c in cells)
    text = (directory / "report.md").read_text()
    # one order of regimes in every report (frozen, partial, full), whatever the grid's order
    assert text.index("### Regime: frozen") < text.index("### Regime: full")
    assert text.count("### Regime: frozen") == 1  # each section once (a merge once doubled the tables)


def test_derived_and_run_trials_share_the_first_epoch(seeds_study):
    """A table's 1-epoch column comes from the derived trials: the 2-epoch run's first epoch."""
    _, directory = seeds_study
    trials = stored_trials(directory)
    for t in (t for t in trials if t["kind"] == "derived"):
        source = next(s for s in trials if s["kind"] == "run" and {**s["point"], "epochs": 1} == t["point"])
        assert t["history"] == source["history"][:1]


def test_selected_trial_and_all_trials_tables(seeds_study):
    _, directory = seeds_study
    study = load_study(directory)
    text = (directory / "report.md").read_text()
    (record,) = study.user_attrs["test_evaluations"]
    (_, selected), (_, per_class) = tables_in(section(text, "Selected trial and test evaluation"))[:2]
    values = dict(selected[1:])
    # two seeds per grid point: the configuration chosen by its mean, then the replicate whose checkpoint was tested
    assert values["configuration"] == record["configuration"]["key"]
    assert values["trial tested (its replicate of best val_accuracy)"] == f"{record['trial']} ({record['key']})"
    n_val = record["n_val"]
    assert values["validation accuracy (best epoch)"] == percent(round(record["val_accuracy"] * n_val), n_val)
    assert values["validation images"] == str(n_val)
    k, n = round(record["test_accuracy"] * record["n_test"]), record["n_test"]
    assert values["test accuracy"] == percent_with_interval(k, n)  # Wilson interval, justified precision
    assert values["test images"] == str(record["n_test"]) and values["test evaluations recorded"] == "1"
    assert per_class[0] == ["class", "test images", "test accuracy (95% CI)"]
    matrix = record["confusion_matrix"]
    expected = {c: percent_with_interval(matrix[i][i], sum(matrix[i])) for i, c in enumerate(record["classes"])}
    assert {r[0]: r[2] for r in per_class[1:]} == expected
    assert [int(r[1]) for r in per_class[1:]] == [sum(row) for row in record["confusion_matrix"]]
    ((_, rows),) = tables_in(section(text, "All trials"))
    header, body = rows[0], rows[1:]
    trials = {t.number: t for t in grid_trials(study)}
    assert sorted(int(r[0]) for r in body) == sorted(trials)
    for r in body:
        row = dict(zip(header, r))
        t = trials[int(row["trial"])]
        h = t.history
        n_val, n_train = t.n_val, t.n_train
        assert row["best val acc"] == percent(round(t.best["val_accuracy"] * n_val), n_val)
        assert row["final val acc"] == percent(round(h[-1]["val_accuracy"] * n_val), n_val) and row[
            "final train acc"
        ] == percent(round(h[-1]["train_accuracy"] * n_train), n_train)
        best = t.best
        tied = [r["epoch"] for r in h if r["epoch"] != best["epoch"] and r["val_accuracy"] == best["val_accuracy"]]
        # a tie on the metric is broken by validation loss (lower), and the report says so
        assert all(r["val_loss"] > best["val_loss"] for r in h if r["epoch"] in tied)
        words = f" (a tie with {', '.join(map(str, tied))}, broken by val_loss)" if tied else ""
        assert row["best epoch"] == f"{best['epoch']}{words}"
        assert (row["input"].endswith("(shared run)")) == (t.kind == "derived")
        assert all(row[a] == str(t.point[a]) for a in ("strategy", "batch_size", "epochs", "seed"))


def test_report_rewritten_from_storage_alone(seeds_study, tmp_path):
    """`study report DIR` regenerates the same tables from the storage (figures aside)."""
    _, directory = seeds_study
    before = (directory / "report.md").read_text()
    assert main(["study", "report", str(directory)]) == 0
    after = (directory / "report.md").read_text()

    def strip(text: str) -> str:  # the recorded command and the report's own date differ
        return re.sub(r"\| report written \|.*", "", re.sub(r"```.*?```", "", text, flags=re.S))

    assert strip(after) == strip(before)


def test_report_reads_its_own_study_from_a_shared_storage(tmp_path):
    """Two studies in one storage (as on a shared PostgreSQL server): each directory's report is its own study's."""
    tree, cache = study_tree(tmp_path / "images"), tmp_path / "cache"
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    grid = {"strategy": ["frozen"], "batch_size": [8], "epochs": [1]}
    first = run_study(
        write_spec(tmp_path / "first.toml", tree, cache, grid, name="first"),
        study_dir=tmp_path / "first",
        storage=shared,
        report=False,
    )
    second = run_study(
        write_spec(tmp_path / "second.toml", tree, cache, {**grid, "batch_size": [16]}, name="second"),
        study_dir=tmp_path / "second",
        storage=shared,
        report=True,
    )
    assert "# transferlab report: second" in (second / "report.md").read_text()
    assert main(["study", "report", str(first)]) == 0
    text = (first / "report.md").read_text()
    assert "# transferlab report: first" in text and "batch size 8" in text and "batch size 16" not in text


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- refusals
def test_report_of_a_missing_directory_or_a_directory_without_a_study_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "report", str(tmp_path / "missing")]) == 2
    assert_one_line_error(capsys.readouterr(), "missing")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    assert main(["study", "report", str(run_dir)]) == 2
    assert_one_line_error(capsys.readouterr(), "study.db")
    assert [p.relative_to(tmp_path) for p in files_under(tmp_path)] == [Path("run/metrics.json")]
