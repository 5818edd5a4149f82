"""Study: the whole grid in one resumable command.

The specification, as tests on synthetic data (3 classes x 12 coloured-noise PNGs of 16 px):
  * a study spec is validated like a run config: a typo or a bad value is one line naming the key;
  * grid points that differ only in epochs, under a schedule that ignores the epoch count, are one job;
  * `run_study` leaves exactly one COMPLETE trial per grid point, records per-epoch intermediate values,
    evaluates the selected trial on the test split exactly once and writes report.md and a
    self-contained report.html;
  * running it again trains nothing; a derived (shared-prefix) trial equals a separate shorter run;
  * a killed study resumes without re-running a finished trial and without losing one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from helpers import (
    check_resumed,
    complete_by_key,
    history_without_time,
    kill,
    load_study,
    quiet,
    snapshot,
    state_file_of,
    study_tree,
    subprocess_env,
    wait_for,
    write_spec,
)

from transferlab.config.study import StudySpec, point_key
from transferlab.errors import ConfigError
from transferlab.study import liveness
from transferlab.study import worker as worker_module
from transferlab.study.plan import plan_jobs
from transferlab.study.records import grid_trials
from transferlab.study.runner import run_study
from transferlab.study.storage import resolve_url

GRID = {"strategy": ["frozen", "full"], "batch_size": [8, 16], "epochs": [1, 2]}


# ---------------------------------------------------------------------------- the spec
@pytest.fixture
def spec_file(tmp_path) -> Path:
    return write_spec(tmp_path / "study.toml", tmp_path / "images", tmp_path / "cache", GRID)


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("table, key", [("run", "batch_sise"), ("grid", "epochz"), (None, "metrc")])
def test_unknown_spec_key_is_one_line_naming_it(tmp_path, table, key):
    spec = write_spec(tmp_path / "s.toml", tmp_path, tmp_path, GRID)
    text = spec.read_text()
    if table is None:
        text = f"{key} = 1\n" + text
    else:
        text = text.replace(f"[{table}]\n", f"[{table}]\n{key} = {'[1]' if table == 'grid' else '1'}\n")
    spec.write_text(text)
    with pytest.raises(ConfigError) as error:
        StudySpec.load(spec)
    message = one_line(error)
    assert repr(key) in message and str(spec) in message
    if table == "run":
        assert "[run]" in message and "batch_size" in message  # the suggestion
    if table == "grid":
        assert "[grid]" in message and "epochs" in message


@pytest.mark.parametrize(
    "axis, values, named",
    [
        ("strategy", ["frozen", "partly"], "strategy"),
        ("batch_size", [8, 0], "batch_size"),
        ("epochs", ["two"], "epochs"),
        ("lr", [], "lr"),
    ],
)
def test_bad_grid_value_is_one_line_naming_the_axis(tmp_path, axis, values, named):
    spec = write_spec(tmp_path / "s.toml", tmp_path, tmp_path, {**GRID, axis: values})
    with pytest.raises(ConfigError) as error:
        StudySpec.load(spec)
    message = one_line(error)
    assert named in message and "[grid]" in message


def test_bad_metric_is_rejected(tmp_path):
    spec = write_spec(tmp_path / "s.toml", tmp_path, tmp_path, GRID, top={"metric": "test_accuracy"})
    with pytest.raises(ConfigError) as error:
        StudySpec.load(spec)
    assert "metric" in one_line(error)


def test_set_overrides_run_and_grid_keys(spec_file):
    spec = StudySpec.load(spec_file, ["data=/x", "grid.epochs=[1]", "run.lr=0.5", "name=other"])
    assert spec.base.data == "/x" and spec.base.lr == 0.5 and spec.name == "other"
    assert spec.grid["epochs"] == [1] and spec.grid["strategy"] == ["frozen", "full"]
    assert len(spec.points()) == 4
    with pytest.raises(ConfigError) as error:
        StudySpec.load(spec_file, ["grid.batch_size=[0]"])
    assert "batch_size" in one_line(error)
    with pytest.raises(ConfigError) as error:
        StudySpec.load(spec_file, ["epochz=3"])
    assert "'epochz'" in one_line(error)


# ---------------------------------------------------------------------------- jobs
def test_constant_schedule_shares_epochs_one_job_per_family(spec_file):
    spec = StudySpec.load(spec_file)
    jobs = plan_jobs(spec)
    assert len(spec.points()) == 8 and len(jobs) == 4
    assert all(job.record == [1, 2] and job.point["epochs"] == 2 for job in jobs)
    families = {(j.point["strategy"], j.point["batch_size"]) for j in jobs}
    assert families == {(s, b) for s in GRID["strategy"] for b in GRID["batch_size"]}
    assert len({j.key for j in jobs}) == 4


@pytest.mark.parametrize("schedule, shared", [("step", True), ("cosine", False), ("onecycle", False)])
def test_epoch_dependent_schedules_get_separate_jobs(spec_file, schedule, shared):
    spec = StudySpec.load(spec_file, [f"schedule={json.dumps(schedule)}"])
    jobs = plan_jobs(spec)
    if shared:
        assert len(jobs) == 4 and all(j.record == [1, 2] for j in jobs)
    else:
        assert len(jobs) == 8 and all(j.record == [j.point["epochs"]] for j in jobs)
        assert {j.key for j in jobs} == {point_key(p) for p in spec.points()}


def test_epochs_as_a_schedule_axis_value_splits_families(tmp_path):
    """schedule on the grid: the constant half shares epochs, the cosine half does not."""
    spec = StudySpec.load(
        write_spec(tmp_path / "s.toml", tmp_path, tmp_path, {"schedule": ["constant", "cosine"], "epochs": [1, 2, 3]})
    )
    jobs = plan_jobs(spec)
    records = sorted((j.point["schedule"], tuple(j.record)) for j in jobs)
    assert records == [("constant", (1, 2, 3)), ("cosine", (1,)), ("cosine", (2,)), ("cosine", (3,))]


# ---------------------------------------------------------------------------- the whole study, once for the module
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tree = study_tree(root / "images")
    spec_path = write_spec(root / "study.toml", tree, root / "cache", GRID)
    directory = run_study(spec_path, study_dir=root / "out", report=True)
    return spec_path, directory


def test_every_grid_point_has_exactly_one_complete_trial(finished):
    spec_path, directory = finished
    spec, study = StudySpec.load(spec_path), load_study(directory)
    by_key = complete_by_key(study)
    assert set(by_key) == {point_key(p) for p in spec.points()}
    assert all(len(trials) == 1 for trials in by_key.values()), {k: [t.number for t in v] for k, v in by_key.items()}
    kinds = sorted(t[0].user_attrs["kind"] for t in by_key.values())
    assert kinds == ["derived"] * 4 + ["run"] * 4
    states = {t.state for t in study.get_trials(deepcopy=False)}
    assert states == {optuna.trial.TrialState.COMPLETE}
    assert len(grid_trials(study)) == 8
    for (trial,) in by_key.values():
        a = trial.user_attrs
        assert a["point"]["epochs"] == len(a["history"]) and [r["epoch"] for r in a["history"]] == list(
            range(1, len(a["history"]) + 1)
        )
        assert trial.value == a["best"]["val_accuracy"] == max(r["val_accuracy"] for r in a["history"])
        assert (directory / a["checkpoint"]).is_file() and (directory / a["run_dir"] / "metrics.json").is_file()


def test_derived_trials_are_prefixes_of_their_source_run(finished):
    _, directory = finished
    study = load_study(directory)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    derived = [t for t in trials.values() if t.user_attrs["kind"] == "derived"]
    assert len(derived) == 4
    for t in derived:
        source = trials[t.user_attrs["source_trial"]]
        assert source.user_attrs["kind"] == "run"
        assert {**t.user_attrs["point"], "epochs": source.user_attrs["point"]["epochs"]} == source.user_attrs["point"]
        n = t.user_attrs["point"]["epochs"]
        assert t.user_attrs["history"] == source.user_attrs["history"][:n]
        assert t.user_attrs["run_dir"] == source.user_attrs["run_dir"]
        assert t.user_attrs["checkpoint"] != source.user_attrs["checkpoint"]


def test_intermediate_values_are_the_per_epoch_metric(finished):
    _, directory = finished
    for t in load_study(directory).get_trials(deepcopy=False):
        expected = {r["epoch"]: r["val_accuracy"] for r in t.user_attrs["history"]}
        assert t.intermediate_values == expected and len(expected) == t.user_attrs["point"]["epochs"]


def test_one_test_evaluation_of_the_best_trial_by_val_accuracy(finished):
    _, directory = finished
    study = load_study(directory)
    evaluations = study.user_attrs["test_evaluations"]
    assert len(evaluations) == 1
    (record,) = evaluations
    trials = grid_trials(study)
    best_value = max(t.value for t in trials)
    chosen = next(t for t in trials if t.number == record["trial"])
    assert chosen.value == best_value and record["key"] == chosen.key
    assert record["val_accuracy"] == chosen.best["val_accuracy"]
    # ties go to the lower validation loss, then fewer epochs, then the lower trial number
    tied = [t for t in trials if t.value == best_value]
    first = min(tied, key=lambda t: (t.best["val_loss"], len(t.history), t.number))
    assert record["trial"] == first.number
    assert (record["tie"] is None) == (len(tied) == 1)
    assert record["n_test"] == sum(map(sum, record["confusion_matrix"]))
    assert record["n_test"] > 0 and 0.0 <= record["test_accuracy"] <= 1.0
    assert record["classes"] == ["blue", "green", "red"]
    assert study.user_attrs["spec"]["grid"] == GRID


def test_report_md_and_self_contained_html(finished):
    _, directory = finished
    md, page = directory / "report.md", directory / "report.html"
    assert md.is_file() and page.is_file()
    text = md.read_text()
    for heading in (
        "## Selected trial and test evaluation",
        "## Results per regime",
        "### Regime: frozen",
        "### Regime: full",
        "## All trials",
        "## Reproduce",
    ):
        assert heading in text
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (directory / target).is_file(), target
    html = page.read_text()
    assert "data:image/png;base64," in html
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.I)
    assert sources and all(s.startswith("data:") for s in sources), [s for s in sources if not s.startswith("data:")]
    assert "<script" not in html.lower() and "@import" not in html


# ---------------------------------------------------------------------------- resuming a finished study
def copy_study(directory: Path, target: Path) -> Path:
    """A private copy of a study directory: a plain copy, which uses its own study.db."""
    shutil.copytree(directory, target)
    return target


def test_running_again_trains_nothing_and_tests_once(finished, tmp_path, monkeypatch):
    spec_path, directory = finished
    copy = copy_study(directory, tmp_path / "again")
    before = snapshot(load_study(copy, url=f"sqlite:///{copy / 'study.db'}"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished study trained again")

    from transferlab.inference import evaluate
    from transferlab.study import select, worker

    monkeypatch.setattr(worker, "run_training", no_training)
    monkeypatch.setattr(evaluate, "evaluate_arrays", no_training)  # nor evaluated on the test split again
    monkeypatch.setattr(select, "analyze_split", no_training)
    original = (directory / "study.db").read_bytes()
    run_study(spec_path, study_dir=copy, report=True)
    study = load_study(copy)
    assert not (copy / "storage.txt").exists()  # the directory's own study.db needs no pointer
    assert (directory / "study.db").read_bytes() == original  # the copy wrote its own file, not the original
    assert snapshot(study) == before
    assert len(study.user_attrs["test_evaluations"]) == 1
    assert "test evaluations recorded | 1 |" in (copy / "report.md").read_text()


def test_a_copy_whose_old_storage_txt_names_the_original_is_refused_in_one_line(finished, tmp_path, capsys):
    """Older versions wrote storage.txt for the directory's own study.db too: in a copy it names the original's,
    which a rerun would silently have written to."""
    from transferlab.cli import main

    spec_path, directory = finished
    copy = copy_study(directory, tmp_path / "old-copy")
    (copy / "storage.txt").write_text(f"sqlite:///{directory.resolve() / 'study.db'}")
    original = (directory / "study.db").read_bytes()
    for argv in (["study", "run", str(spec_path), "--dir", str(copy)], ["study", "report", str(copy)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "storage.txt" in err and "its own study.db" in err, err
    assert (directory / "study.db").read_bytes() == original
    (copy / "storage.txt").unlink()  # what the message says to do
    assert main(["study", "report", str(copy)]) == 0


# ---------------------------------------------------------------------------- shared epochs == a separate shorter run
@pytest.mark.parametrize("strategy, batch_size", [("frozen", 8), ("full", 16)])
def test_derived_trial_equals_a_separate_shorter_run(finished, tmp_path, strategy, batch_size):
    from transferlab.engine.train import run_training

    spec_path, directory = finished
    spec = StudySpec.load(spec_path)
    point = {"strategy": strategy, "batch_size": batch_size, "epochs": 1}
    (derived,) = complete_by_key(load_study(directory))[point_key(point)]
    assert derived.user_attrs["kind"] == "derived"
    config = spec.config_for(point)
    assert config.schedule == "constant" and config.seed == 0
    result = run_training(config, tmp_path / "alone", log=quiet)
    assert history_without_time(result.history) == history_without_time(derived.user_attrs["history"])
    # and the checkpoint recorded at epoch 1 is the separate run's best checkpoint
    alone = torch.load(tmp_path / "alone" / "best.pt", map_location="cpu", weights_only=True)
    shared = torch.load(directory / derived.user_attrs["checkpoint"], map_location="cpu", weights_only=True)
    assert alone["epoch"] == shared["epoch"] == 1
    assert all(torch.equal(alone["model"][k], shared["model"][k]) for k in alone["model"])


# ---------------------------------------------------------------------------- a killed study resumes


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_or_losing_trials(tmp_path, monkeypatch, capfd):
    tree = study_tree(tmp_path / "images")
    # frozen finishes in a moment; the full run's 12 epochs are long enough to be killed in the middle
    spec_path = write_spec(
        tmp_path / "study.toml",
        tree,
        tmp_path / "cache",
        {"strategy": ["frozen", "full"], "epochs": [1, 12]},
        batch_size=16,
    )
    spec = StudySpec.load(spec_path)
    directory = tmp_path / "out"
    long_full = point_key({"strategy": "full", "epochs": 12})
    state_file = state_file_of(directory, long_full)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "transferlab.cli",
                "study",
                "run",
                str(spec_path),
                "--dir",
                str(directory),
                "--no-report",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
        try:
            wait_for(state_file, 120, proc, "the full run's first epoch")
        finally:
            kill(proc)
    killed_log = (tmp_path / "killed.log").read_text()
    assert "training" in killed_log and "selected trial" not in killed_log
    before = snapshot(load_study(directory))
    assert sum(1 for v in before.values() if v[0] == optuna.trial.TrialState.COMPLETE) == 2  # frozen: run + derived
    capfd.readouterr()

    # The killed process was on this machine and is gone: the rerun re-queues its trial at once, not after the
    # heartbeat's grace period (an hour here; the wait loop would spin on until the guard below stops it).
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(liveness, "GRACE_SECONDS", 3600)
    checks = []
    fail_stale = worker_module.fail_stale_trials

    def guarded(study):
        checks.append(1)
        assert len(checks) < 30, "the rerun waited for the heartbeat's grace period"
        fail_stale(study)

    monkeypatch.setattr(worker_module, "fail_stale_trials", guarded)
    run_study(spec_path, study_dir=directory, report=False)
    err = capfd.readouterr().err
    assert re.search(r"trial \d+: its process \(\d+\) is gone; queued again", err), err
    assert re.search(r"resuming from epoch [1-9]", err), err  # the retry continued from state.pt
    study = load_study(directory)
    check_resumed(study, spec, before, long_full, directory)
    (full_run,) = complete_by_key(study)[long_full]
    assert [r["epoch"] for r in full_run.user_attrs["history"]] == list(range(1, 13))
    # epochs restored from state.pt are reported to Optuna too, not only those trained after the resume
    assert full_run.intermediate_values == {r["epoch"]: r["val_accuracy"] for r in full_run.user_attrs["history"]}
    assert state_file() is None  # the study deletes a finished trial's resume state
    assert len(study.user_attrs["test_evaluations"]) == 1


def test_storage_txt_keeps_a_copy_on_its_own_files_and_shared_storage_shared(tmp_path, monkeypatch):
    from transferlab.study.storage import save_url

    a, b, c = (tmp_path / name for name in "ABC")
    for folder in (a, c):
        folder.mkdir()
        (folder / "study.db").write_bytes(b"")
    save_url(a, f"sqlite:///{a / 'custom.db'}")  # a SQLite file of its own under another name
    shutil.copytree(a, b)
    assert resolve_url(b, None) == f"sqlite:///{b.resolve() / 'custom.db'}"  # the copy's, not A's
    save_url(c, f"sqlite:///{a.resolve() / 'study.db'}")  # C, which once had its own, now shares A's on purpose
    assert resolve_url(c, None) == f"sqlite:///{a.resolve() / 'study.db'}"
    monkeypatch.chdir(tmp_path)
    save_url(a, "sqlite:///A/study.db")  # its own file spelled relative to the working directory
    assert not (a / "storage.txt").exists() and resolve_url(a, None) == f"sqlite:///{a.resolve() / 'study.db'}"
    save_url(c, "sqlite:///A/other.db")  # another folder's file, relative: saved absolute
    monkeypatch.chdir("/")
    assert resolve_url(c, None) == f"sqlite:///{a.resolve() / 'other.db'}"


def test_a_study_folder_whose_name_looks_like_url_syntax_keeps_its_study_db_inside(tmp_path):
    from transferlab.study.storage import default_url, save_url
    from transferlab.urls import sqlite_url

    folder = tmp_path / "runs?lr=1e-3 %41#1"  # '?' would start a URL's query, '%41' read as 'A', '#' a fragment
    folder.mkdir()
    optuna.create_study(study_name="s", storage=default_url(folder))
    assert [p.name for p in folder.iterdir()] == ["study.db"] and list(tmp_path.iterdir()) == [folder]
    other = sqlite_url(folder / "other.db")  # a file of the folder's under another name: storage.txt says folder:
    save_url(folder, other)
    assert resolve_url(folder, None) == other
    optuna.create_study(study_name="t", storage=other)
    assert sorted(p.name for p in folder.iterdir()) == ["other.db", "storage.txt", "study.db"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_only_a_trial_whose_own_process_is_gone_from_this_machine_is_failed_and_queued_again(tmp_path):
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from transferlab.study.liveness import fail_orphaned_trials, owner_is_gone, process_identity

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: no process has its pid (until the system hands it out again)
    me = process_identity()
    assert not owner_is_gone(me) and not owner_is_gone(None) and not owner_is_gone({})
    assert owner_is_gone({**me, "pid": ended.pid})
    assert owner_is_gone({**me, "started": "1"})  # this pid, but a process started at another time: the pid reused
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not owner_is_gone({**me, "pid": killed.pid, "started": None})
        os.kill(killed.pid, signal.SIGKILL)
        wait_for(lambda: owner_is_gone({**me, "pid": killed.pid, "started": None}), 30, what="a zombie")
    finally:
        killed.wait()  # a killed worker stays a zombie until its parent reaps it: gone all the same
    assert not owner_is_gone({**me, "pid": ended.pid, "host": me["host"] + "-elsewhere"})
    assert not owner_is_gone({**me, "pid": ended.pid, "boot": "another boot"})

    storage = RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60, grace_period=3600,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())  # fmt: skip
    study = optuna.create_study(storage=storage)
    gone, alive, inherited = study.ask(), study.ask(), study.ask()
    gone.set_user_attr("owner", {**me, "pid": ended.pid, "trial": gone.number})
    alive.set_user_attr("owner", {**me, "trial": alive.number})
    inherited.set_user_attr("owner", {**me, "pid": ended.pid, "trial": gone.number})  # a retry's copied attribute
    assert fail_orphaned_trials(study) == [gone.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[gone.number] == optuna.trial.TrialState.FAIL
    assert states[alive.number] == states[inherited.number] == optuna.trial.TrialState.RUNNING
    (retry,) = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert retry.system_attrs["failed_trial"] == gone.number
    assert fail_orphaned_trials(study) == []  # once
