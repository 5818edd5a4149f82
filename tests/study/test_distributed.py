"""Workers on several processes share one study through a PostgreSQL storage.

Needs a server: TRANSFERLAB_TEST_POSTGRES_URL=postgresql+psycopg2://USER@HOST:PORT/DB (`bash .ci/postgres.sh`
starts a throwaway one and prints it). Each test works in a database of its own, created on that
server and dropped afterwards.
  * two `study worker` processes empty one queue: every job trains exactly once, none fails;
  * a worker killed with SIGKILL in the middle of a trial: `study run` finishes the study without
    re-running a finished trial and without losing one;
  * two `study worker` processes share a study's searches: each search ends with exactly n_trials finished trials,
    none trained twice, none failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import (
    NEEDS_POSTGRES,
    check_resumed,
    complete_by_key,
    kill,
    load_study,
    snapshot,
    state_file_of,
    study_tree,
    subprocess_env,
    wait_for,
    write_spec,
)

from transferlab.config.study import StudySpec, point_key
from transferlab.study import liveness
from transferlab.study.plan import enqueue_missing
from transferlab.study.runner import open_study, record_spec
from transferlab.study.search import plan_searches
from transferlab.study.worker import Worker

pytestmark = [pytest.mark.postgres, pytest.mark.slow, NEEDS_POSTGRES]


def create_queued_study(spec_path: Path, directory: Path, url: str) -> tuple[StudySpec, list]:
    """What `study run` does before it starts working: the study, and one waiting trial per job."""
    spec = StudySpec.load(spec_path)
    directory.mkdir(parents=True, exist_ok=True)
    study = open_study(spec, url, directory / "study.lock")
    jobs = Worker(spec, directory, study).plan()
    assert enqueue_missing(study, jobs, directory / "study.lock") == len(jobs)
    return spec, jobs


def worker(spec_path: Path, directory: Path, url: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "transferlab.cli",
                "study",
                "worker",
                str(spec_path),
                "--dir",
                str(directory),
                "--storage",
                url,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )


def trainings(log_text: str) -> list[str]:
    """The job key of every training a worker started (its log: 'trial N: KEY ...' then 'training ...')."""
    keys, current = [], None
    for line in log_text.splitlines():
        if m := re.search(r"\btrial \d+: (\S+)", line):
            current = m.group(1)
        elif re.search(r"\d\d:\d\d:\d\d training ", line):
            keys.append(current)
    return keys


def test_two_workers_train_every_job_exactly_once(tmp_path, database):
    tree = study_tree(tmp_path / "images")
    # 6 jobs of 8 epochs each (frozen: cached features, a second or two per job); both workers start together
    spec_path = write_spec(
        tmp_path / "study.toml",
        tree,
        tmp_path / "cache",
        {"strategy": ["frozen"], "batch_size": [4, 8], "seed": [0, 1, 2], "epochs": [2, 8]},
        name="shared",
    )
    directory = tmp_path / "out"
    spec, jobs = create_queued_study(spec_path, directory, database)
    assert len(jobs) == 6 and len(spec.points()) == 12
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [worker(spec_path, directory, database, log) for log in logs]
    for p in procs:
        p.wait(timeout=240)
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], texts

    study = load_study(directory, url=database)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert optuna.trial.TrialState.FAIL not in states and optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING not in states
    runs = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs["kind"] == "run"
    ]
    assert sorted(t.user_attrs["key"] for t in runs) == sorted(j.key for j in jobs)  # each job's trial completed once
    by_key = complete_by_key(study)
    assert set(by_key) == {point_key(p) for p in spec.points()} and all(len(v) == 1 for v in by_key.values())
    # each job trained once, by one worker (a second training of a key would show in a log)
    trained = [key for text in texts for key in trainings(text)]
    assert sorted(trained) == sorted(j.key for j in jobs), texts
    assert not any("resuming from epoch" in text for text in texts)
    print("jobs per worker:", [len(trainings(t)) for t in texts])


def test_killed_worker_resumes_without_rerunning_or_losing_trials(tmp_path, database, monkeypatch, capfd):
    from transferlab.cli import main

    tree = study_tree(tmp_path / "images")
    spec_path = write_spec(
        tmp_path / "study.toml",
        tree,
        tmp_path / "cache",
        {"strategy": ["frozen", "full"], "epochs": [1, 12]},
        name="killed",
        batch_size=16,
    )
    directory = tmp_path / "out"
    spec, jobs = create_queued_study(spec_path, directory, database)
    long_full = point_key({"strategy": "full", "epochs": 12})
    state_file = state_file_of(directory, long_full)
    proc = worker(spec_path, directory, database, tmp_path / "worker.log")
    try:
        # the frozen job (trial 0) is complete once the full job (trial 1) has started; kill it mid-run
        wait_for(state_file, 120, proc, "the full run's first epoch")
    finally:
        kill(proc)
    before = snapshot(load_study(directory, url=database))
    assert sum(1 for v in before.values() if v[0] == optuna.trial.TrialState.COMPLETE) == 2  # frozen: run + derived
    capfd.readouterr()

    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(liveness, "GRACE_SECONDS", 2)
    assert main(["study", "run", str(spec_path), "--dir", str(directory), "--storage", database, "--no-report"]) == 0
    err = capfd.readouterr().err
    assert re.search(r"resuming from epoch [1-9]", err), err
    study = load_study(directory, url=database)
    check_resumed(study, spec, before, long_full, directory)
    (full_run,) = complete_by_key(study)[long_full]
    assert full_run.intermediate_values == {r["epoch"]: r["val_accuracy"] for r in full_run.user_attrs["history"]}
    assert len(full_run.user_attrs["history"]) == 12
    assert len(study.user_attrs["test_evaluations"]) == 1
    assert (directory / "storage.txt").read_text().strip().splitlines()[-1] == database


def test_two_workers_share_the_searches_and_finish_each_at_n_trials(tmp_path, database):
    from helpers import search_spec

    spec_path = search_spec(tmp_path / "study.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                            {"sampler": "random", "n_trials": 4, "pruner": "none"}, grid={"batch_size": [4, 8]},
                            name="searches", epochs=2)  # fmt: skip
    directory = tmp_path / "out"
    spec = StudySpec.load(spec_path)  # what `study run` does before it starts working: the study, its searches
    directory.mkdir()
    study = open_study(spec, database, directory / "study.lock")
    searches = plan_searches(Worker(spec, directory, study))
    record_spec(study, spec, spec_path, database, [], searches)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [worker(spec_path, directory, database, log) for log in logs]
    for p in procs:
        p.wait(timeout=240)
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], texts
    trained = []
    for search in searches:
        trials = optuna.load_study(study_name=search.name, storage=database).get_trials(deepcopy=False)
        assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
        finished = [t for t in trials if "skipped" not in t.user_attrs]
        assert len(finished) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
        trained += [t.user_attrs["identity"] for t in finished]
    assert len(set(trained)) == 8  # 2 searches x 4 trials, each trained once
    assert sum(len(re.findall(r"\d\d:\d\d:\d\d training ", t)) for t in texts) == 8, texts
    print("trials per worker:", [len(re.findall(r"\d\d:\d\d:\d\d training ", t)) for t in texts])
