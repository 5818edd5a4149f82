"""What a study trains, reuses and refuses: trial identity, concurrent runs, run directories, state.

- A trial's identity is its grid point plus a hash of everything that trains it: a changed [run] setting, other data
  or changed files train again, an unchanged point is reused; selection and the report use the current spec's trials.
- Two `study run` started together train each job exactly once; a job queued twice is trained once.
- Run directories `<readable key>-<hash>` of keys sharing a long prefix never collide.
- The heartbeat grace is far above a SQLite lock wait, and configurable; state.pt is deleted once a trial is complete.
- With test_fraction = 0 nothing is tested, and log and report say so; val_loss governs each trial's best epoch.
- A waiting trial of an earlier spec is marked stale, not run; a grid point whose last batch holds one image completes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from helpers import (
    complete_by_key,
    load_study,
    study_tree,
    subprocess_env,
    write_spec,
)

from transferlab.config.run import RunConfig
from transferlab.config.study import StudySpec
from transferlab.errors import ConfigError, StudyError, WeightsError
from transferlab.report.data import StudyData
from transferlab.study import liveness
from transferlab.study import worker as worker_module
from transferlab.study.identity import slug, trial_identity
from transferlab.study.plan import QUEUED, enqueue_missing
from transferlab.study.records import TrialRecord
from transferlab.study.runner import open_study, run_study
from transferlab.study.select import select_and_test
from transferlab.study.worker import Worker

COMPLETE = optuna.trial.TrialState.COMPLETE


SMALL = {"strategy": ["frozen"], "batch_size": [8], "epochs": [1]}


def runs(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials actually trained (kind run, complete)."""
    return [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if t.user_attrs["kind"] == "run"]


@pytest.fixture
def tree(tmp_path) -> Path:
    return study_tree(tmp_path / "images")


def trainings(text: str) -> int:
    return sum(" training " in line for line in text.splitlines())


def study(trials: list[dict], grid: dict, test: dict) -> StudyData:
    """A study's report data built by hand: trials and selection as the records the storage holds."""
    return StudyData("hand", {"name": "hand", "grid": grid}, "transferlab study run x.toml",
                     [TrialRecord(**t) for t in trials], grid, test, 1, {})  # fmt: skip


# ---------------------------------------------------------------------------- 1. a trial's identity
def test_identity_hashes_what_trains_and_nothing_else(tree, tmp_path):
    point = {"lr": 0.01}
    config = RunConfig.from_dict({"data": str(tree), "weights": "none", "lr": 0.01})
    same = RunConfig.from_dict({"progress": False, "cache_dir": "/elsewhere", "record_epochs": [1]}, base=config)
    base = trial_identity(point, config, "data-a")
    assert base.startswith("lr=0.01#")
    assert trial_identity(point, same, "data-a") == base
    assert trial_identity(point, RunConfig.from_dict({"seed": 1}, base=config), "data-a") != base
    assert trial_identity(point, config, "data-b") != base
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    with_file = RunConfig.from_dict({"weights": str(weights)}, base=config)
    first = trial_identity(point, with_file, "data-a")
    weights.write_bytes(b"two")
    os.utime(weights, ns=(1, 1))  # a new mtime too: the digest is cached per (path, size, mtime)
    assert trial_identity(point, with_file, "data-a") != first


def test_changed_run_setting_trains_again_and_the_report_shows_the_current_spec_only(tree, tmp_path, capfd):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    directory = tmp_path / "out"
    run_study(spec_path, study_dir=directory, report=False)
    first = runs(load_study(directory))
    assert len(first) == 1
    run_study(spec_path, study_dir=directory, overrides=["lr=0.5"], report=True)
    study = load_study(directory)
    second = [t for t in runs(study) if t.number != first[0].number]
    assert len(second) == 1 and second[0].user_attrs["config"]["lr"] == 0.5  # trained again under the new setting
    assert study.user_attrs["selected"]["trial"] == second[0].number
    assert study.user_attrs["spec"]["run"]["lr"] == 0.5
    text = (directory / "report.md").read_text()
    assert "The storage also holds 1 trial from earlier specs, not shown." in text
    all_trials = text[text.index("## All trials") :]
    assert f"| {second[0].number} |" in all_trials and f"| {first[0].number} |" not in all_trials
    assert study.trials[first[0].number].state == COMPLETE  # the old trial stays in the storage
    capfd.readouterr()
    run_study(spec_path, study_dir=directory, report=False)  # back to the first spec: its trial is reused
    assert len(runs(load_study(directory))) == 2
    assert load_study(directory).user_attrs["selected"]["trial"] == first[0].number


def test_other_data_or_changed_files_train_again(tree, tmp_path):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    directory = tmp_path / "out"
    run_study(spec_path, study_dir=directory, report=False)
    other = study_tree(tmp_path / "other")
    run_study(spec_path, study_dir=directory, overrides=[f"data={str(other)!r}"], report=False)
    assert len(runs(load_study(directory))) == 2
    red = sorted((other / "red").iterdir())
    (other / "red" / "extra.png").write_bytes(red[0].read_bytes())  # the folder changed: a new fingerprint
    run_study(spec_path, study_dir=directory, overrides=[f"data={str(other)!r}"], report=False)
    assert len(runs(load_study(directory))) == 3


def test_narrowed_grid_selects_inside_it_and_extended_grid_trains_only_the_new_points(tree, tmp_path):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", {**SMALL, "batch_size": [8, 16]})
    directory = tmp_path / "out"
    run_study(spec_path, study_dir=directory, report=False)
    assert len(runs(load_study(directory))) == 2
    run_study(spec_path, study_dir=directory, overrides=["grid.batch_size=[16]"], report=True)
    study = load_study(directory)
    assert len(runs(study)) == 2  # nothing trained
    assert study.user_attrs["selected"]["point"]["batch_size"] == 16
    assert "The storage also holds 1 trial from earlier specs, not shown." in (directory / "report.md").read_text()
    run_study(spec_path, study_dir=directory, overrides=["grid.batch_size=[16, 32]"], report=True)
    study = load_study(directory)
    assert sorted(t.user_attrs["point"]["batch_size"] for t in runs(study)) == [8, 16, 32]
    all_trials = (directory / "report.md").read_text().split("## All trials")[1].split("## Reproduce")[0]
    assert all_trials.count("| frozen |") == 2  # batch sizes 16 and 32, not 8


# ---------------------------------------------------------------------------- 2. two `study run` at once
def test_two_study_runs_at_once_train_each_job_once(tree, tmp_path):
    spec_path = write_spec(
        tmp_path / "s.toml", tree, tmp_path / "cache", {"strategy": ["frozen"], "batch_size": [4, 8], "seed": [0, 1]}
    )
    directory = tmp_path / "out"
    command = [sys.executable, "-m", "transferlab.cli", "study", "run", str(spec_path), "--dir", str(directory)]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as out:
            procs.append(
                subprocess.Popen(command + ["--no-report"], stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
            )
    for p in procs:
        p.wait(timeout=300)
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], texts
    study = load_study(directory)
    by_key = complete_by_key(study)
    assert len(by_key) == 4 and all(len(v) == 1 for v in by_key.values()), texts
    assert sum(trainings(t) for t in texts) == 4, texts


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() stands for a busy worker
def test_a_job_queued_twice_is_trained_once_and_the_copy_pruned(tree, tmp_path):
    spec = StudySpec.load(write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL))
    directory = tmp_path / "out"
    directory.mkdir()
    study = open_study(spec, f"sqlite:///{directory / 'study.db'}", directory / "study.lock")
    worker = Worker(spec, directory, study)
    (job,) = worker.plan()
    for _ in range(2):  # as two processes reading before either wrote
        study.enqueue_trial(params={}, user_attrs=job.trial_record().attrs(*QUEUED), skip_if_exists=False)
    assert enqueue_missing(study, [job], directory / "study.lock") == 0  # a queued job is not queued again
    worker.run(wait_for_others=False)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [COMPLETE, optuna.trial.TrialState.PRUNED]
    assert trials[1].user_attrs["duplicate_of"] == 0
    # the copy is claimed while the first claim is still running: the later claim yields
    job.config["lr"] = 0.02  # another job: not complete yet
    job.identities = {1: "another#1"}
    for _ in range(2):
        study.enqueue_trial(params={}, user_attrs=job.trial_record().attrs(*QUEUED), skip_if_exists=False)
    first = study.ask()  # claimed by a worker busy elsewhere
    study.optimize(worker.objective, n_trials=1, catch=())
    assert study.trials[-1].state == optuna.trial.TrialState.PRUNED
    assert study.trials[-1].user_attrs["duplicate_of"] == first.number


def test_a_copy_claimed_before_the_lower_numbered_copy_yields_to_it(tree, tmp_path):
    """Two workers claim both copies at once and the higher-numbered claim commits first: it must not train too."""
    spec = StudySpec.load(write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL))
    directory = tmp_path / "out"
    directory.mkdir()
    study = open_study(spec, f"sqlite:///{directory / 'study.db'}", directory / "study.lock")
    worker = Worker(spec, directory, study)
    (job,) = worker.plan()
    for _ in range(2):
        study.enqueue_trial(params={}, user_attrs=job.trial_record().attrs(*QUEUED), skip_if_exists=False)
    lower, higher = study.get_trials(deepcopy=False)
    study._storage.set_trial_state_values(higher._trial_id, optuna.trial.TrialState.RUNNING)  # its claim, first
    with pytest.raises(optuna.TrialPruned):
        worker.objective(optuna.trial.Trial(study, higher._trial_id))
    assert study._storage.get_trial(higher._trial_id).user_attrs["duplicate_of"] == lower.number
    assert not (directory / "trials").exists()  # nothing trained by the copy
    worker.run(wait_for_others=False)  # the lower-numbered copy is still waiting: it trains
    assert study.trials[lower.number].state == COMPLETE


def test_a_worker_trains_the_config_queued_and_refuses_other_data(tree, tmp_path):
    """A worker started with another spec trains what was queued; data changed since the queueing is refused."""
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", {**SMALL, "batch_size": [8, 16]})
    queued, other = StudySpec.load(spec_path), StudySpec.load(spec_path, ["lr=0.5"])
    directory = tmp_path / "out"
    directory.mkdir()
    study = open_study(queued, f"sqlite:///{directory / 'study.db'}", directory / "study.lock")
    assert enqueue_missing(study, Worker(queued, directory, study).plan(), directory / "study.lock") == 2
    worker = Worker(other, directory, study)
    study.optimize(worker.objective, n_trials=1)
    (trained,) = runs(study)
    assert trained.user_attrs["config"]["lr"] == queued.base.lr != 0.5
    red = sorted((tree / "red").iterdir())
    (tree / "red" / "extra.png").write_bytes(red[0].read_bytes())
    with pytest.raises(StudyError, match="differ from those it was queued with"):
        study.optimize(Worker(queued, directory, study).objective, n_trials=1, catch=())


# ---------------------------------------------------------------------------- 3. run directory names
def test_run_directories_of_keys_sharing_a_long_prefix_differ():
    prefix = "variant=" + "x" * 200
    a, b = f"{prefix},lr=0.1", f"{prefix},lr=0.2"
    assert slug(a, a + "#1") != slug(b, b + "#1")
    assert slug(a, a + "#1") != slug(a, a + "#2")
    assert len(slug(a, a)) < 150 and slug("lr=0.1", "i").startswith("lr=0.1-")


# ---------------------------------------------------------------------------- 5. heartbeat grace
def test_heartbeat_grace_is_far_above_a_sqlite_lock_wait_and_configurable(monkeypatch):
    monkeypatch.delenv(liveness.GRACE_ENV, raising=False)
    assert liveness.grace_seconds() >= 120
    monkeypatch.setenv(liveness.GRACE_ENV, "30")
    assert liveness.grace_seconds() == 30
    monkeypatch.setenv(liveness.GRACE_ENV, "soon")
    with pytest.raises(ConfigError) as error:
        liveness.grace_seconds()
    assert liveness.GRACE_ENV in str(error.value)


# ---------------------------------------------------------------------------- the study drops state.pt
def test_state_pt_is_deleted_once_the_trial_is_complete(tree, tmp_path, monkeypatch):
    """fit keeps state.pt (so that a rerun of a finished run returns its result): the study deletes it."""
    from transferlab.study import worker

    training = worker.run_training

    def training_keeping_state(*args, **kwargs):
        result = training(*args, **kwargs)
        (result.out_dir / "state.pt").write_bytes(b"kept by fit")
        return result

    monkeypatch.setattr(worker, "run_training", training_keeping_state)
    directory = run_study(write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL), study_dir=tmp_path / "o")
    assert (directory / "trials").is_dir() and not list((directory / "trials").rglob("state.pt"))


# ---------------------------------------------------------------------------- 6. no test split
def test_without_a_test_split_nothing_is_tested_and_log_and_report_say_so(tree, tmp_path, capfd):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL, test_fraction=0.0)
    directory = run_study(spec_path, study_dir=tmp_path / "out", report=True)
    err = " ".join(capfd.readouterr().err.split())  # the console wraps long lines
    assert "no test split (test_fraction = 0): the selected trial was not evaluated on a test set" in err
    assert "test accuracy" not in err
    study = load_study(directory)
    assert "test_evaluations" not in study.user_attrs and study.user_attrs["selected"]["test"] is None
    text = (directory / "report.md").read_text()
    assert "no test split" in text and "test accuracy" not in text


def test_val_loss_metric_governs_each_trials_best_epoch_value_and_checkpoint(tree, tmp_path):

    grid = {"strategy": ["frozen"], "batch_size": [8], "epochs": [3]}
    spec_path = write_spec(
        tmp_path / "s.toml", tree, tmp_path / "cache", grid, top={"metric": "val_loss"}, head="linear", lr=0.3
    )
    directory = run_study(spec_path, study_dir=tmp_path / "out", report=False)
    (trial,) = runs(load_study(directory))
    losses = [r["val_loss"] for r in trial.user_attrs["history"]]
    assert trial.value == min(losses) and trial.user_attrs["best"]["val_loss"] == min(losses)
    checkpoint = torch.load(directory / trial.user_attrs["checkpoint"], weights_only=True)
    assert checkpoint["metric"] == "val_loss" and checkpoint["val_loss"] == min(losses)


# ---------------------------------------------------------------------------- 8, 9. bad storages, one-line errors
def test_selecting_an_unfinished_study_is_a_study_error(tree, tmp_path):
    spec = StudySpec.load(write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL))
    study = open_study(spec, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "study.lock")
    with pytest.raises(StudyError, match="not complete"):
        select_and_test(study, spec, tmp_path)


# ---------------------------------------------------------------------------- lost results
def test_a_waiting_trial_of_an_earlier_spec_is_marked_stale_not_run(make_tree, tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=12, size=16), tmp_path / "cache",
                      {"strategy": ["frozen", "full"], "epochs": [1]}, head="linear")  # fmt: skip
    real_training = worker_module.run_training

    def missing_weights(*args, **kwargs):  # the first spec's weights cannot be loaded
        raise WeightsError("weights file w.pth does not exist", "pass {any}")

    monkeypatch.setattr(worker_module, "run_training", missing_weights)
    with pytest.raises(WeightsError, match=r"--set weights="):  # the study's fix, not train's --weights
        run_study(spec, study_dir=tmp_path / "out", report=False)
    trained = []

    def counted(config, *args, **kwargs):
        trained.append(config.lr)
        return real_training(config, *args, **kwargs)

    monkeypatch.setattr(worker_module, "run_training", counted)
    run_study(spec, study_dir=tmp_path / "out", overrides=["lr=0.02"])  # the spec fixed: other identities
    assert trained == [0.02, 0.02]  # the earlier spec's waiting trial was not trained
    study = load_study(tmp_path / "out")
    stale = [t for t in study.get_trials(deepcopy=False) if "stale" in t.user_attrs]
    assert len(stale) == 1 and stale[0].state.name == "PRUNED"
    assert "1 trial queued by an earlier spec" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------------------- tracebacks
def test_a_study_point_with_a_last_batch_of_one_completes(make_tree, tmp_path):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=15, size=16), tmp_path / "cache",
                      {"batch_size": [13], "epochs": [1]}, head="mlp")  # fmt: skip
    run_study(spec, study_dir=tmp_path / "out", report=False)
    assert load_study(tmp_path / "out").user_attrs["selected"]["trial"] == 0
