"""Study reliability: what a study trains, reuses, reports and refuses.

The specification, as tests on the synthetic study of test_study (3 classes x 12 PNGs of 16 px):
  * a trial's identity is its grid point plus a hash of everything that trains it (the resolved run config but
    progress, cache_dir and record_epochs; the data's fingerprint; the pretrained weights): a changed [run]
    setting, other data or changed files train again, an unchanged point is reused; selection and the report
    use the current spec's trials only, and the report says how many trials of earlier specs the storage holds;
  * two `study run` started together on one directory train each job exactly once; a worker that claims a
    trial whose job another trial finished or claimed first prunes it as a duplicate instead of training it;
  * run directories are `<readable key>-<hash of the identity>`: two keys sharing a long prefix never collide;
  * a grid value given twice (1 and 1.0 are one value) is a one-line error naming the axis and the value;
  * the heartbeat grace is far above a SQLite lock wait, and configurable;
  * the study deletes a trial's state.pt once the trial is recorded complete;
  * with test_fraction = 0 the selected trial is not evaluated on a test set, and log and report say so;
  * a storage password never lands in a file, a log line, the report or an error message; it is accepted in
    the URL, in the environment variable the spec names, or the driver's usual ways (PGPASSWORD, ~/.pgpass);
  * a bad --storage, a missing or corrupt storage, a missing study directory and --workers < 1 are one-line
    errors (exit 2) that create nothing and change nothing;
  * the report reads the storage only: it never imports the study runner.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from test_distributed import database  # noqa: F401 (fixture: a fresh PostgreSQL database per test)
from test_study import (  # noqa: F401 (_one_thread: autouse fixture)
    _one_thread,
    complete_by_key,
    load,
    make_tree,
    subprocess_env,
    write_spec,
)

from transferlab.cli import main
from transferlab.config.run import RunConfig
from transferlab.config.study import StudySpec
from transferlab.errors import ConfigError, StudyError
from transferlab.study import liveness
from transferlab.study.identity import slug, trial_identity
from transferlab.study.plan import QUEUED, enqueue_missing
from transferlab.study.runner import open_study, run_study
from transferlab.study.select import select_and_test
from transferlab.study.storage import resolve_url
from transferlab.study.worker import Worker
from transferlab.urls import hide, redact, without_password

COMPLETE = optuna.trial.TrialState.COMPLETE
SMALL = {"strategy": ["frozen"], "batch_size": [8], "epochs": [1]}
SECRET = "s3cr3t-Pa55"
POSTGRES = os.environ.get("TRANSFERLAB_TEST_POSTGRES_URL", "")


def runs(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials actually trained (kind run, complete)."""
    return [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if t.user_attrs["kind"] == "run"]


def cli(*argv: str, capsys) -> tuple[int, str]:
    """main(argv) -> (status, stderr)."""
    status = main(list(argv))
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, *, hidden: str = SECRET) -> str:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferlab: error: "), err
    assert "Traceback" not in err and hidden not in err
    return lines[0]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "images")


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
    first = runs(load(directory))
    assert len(first) == 1
    run_study(spec_path, study_dir=directory, overrides=["lr=0.5"], report=True)
    study = load(directory)
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
    assert len(runs(load(directory))) == 2
    assert load(directory).user_attrs["selected"]["trial"] == first[0].number


def test_other_data_or_changed_files_train_again(tree, tmp_path):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    directory = tmp_path / "out"
    run_study(spec_path, study_dir=directory, report=False)
    other = make_tree(tmp_path / "other")
    run_study(spec_path, study_dir=directory, overrides=[f"data={str(other)!r}"], report=False)
    assert len(runs(load(directory))) == 2
    red = sorted((other / "red").iterdir())
    (other / "red" / "extra.png").write_bytes(red[0].read_bytes())  # the folder changed: a new fingerprint
    run_study(spec_path, study_dir=directory, overrides=[f"data={str(other)!r}"], report=False)
    assert len(runs(load(directory))) == 3


def test_narrowed_grid_selects_inside_it_and_extended_grid_trains_only_the_new_points(tree, tmp_path):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", {**SMALL, "batch_size": [8, 16]})
    directory = tmp_path / "out"
    run_study(spec_path, study_dir=directory, report=False)
    assert len(runs(load(directory))) == 2
    run_study(spec_path, study_dir=directory, overrides=["grid.batch_size=[16]"], report=True)
    study = load(directory)
    assert len(runs(study)) == 2  # nothing trained
    assert study.user_attrs["selected"]["point"]["batch_size"] == 16
    assert "The storage also holds 1 trial from earlier specs, not shown." in (directory / "report.md").read_text()
    run_study(spec_path, study_dir=directory, overrides=["grid.batch_size=[16, 32]"], report=True)
    study = load(directory)
    assert sorted(t.user_attrs["point"]["batch_size"] for t in runs(study)) == [8, 16, 32]
    all_trials = (directory / "report.md").read_text().split("## All trials")[1].split("## Reproduce")[0]
    assert all_trials.count("| frozen |") == 2  # batch sizes 16 and 32, not 8


# ---------------------------------------------------------------------------- 2. two `study run` at once
def trainings(text: str) -> int:
    return sum(" training " in line for line in text.splitlines())


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
    study = load(directory)
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


# ---------------------------------------------------------------------------- 4. a grid value given twice
@pytest.mark.parametrize("values, shown", [([0.001, 0.001], "0.001"), ([1, 1.0], "1.0"), (["a", "b", "a"], "'a'")])
def test_a_grid_value_given_twice_is_one_line_naming_axis_and_value(tmp_path, values, shown):
    axis = "seed" if values == [1, 1.0] else "lr" if isinstance(values[0], float) else "variant"
    spec = write_spec(tmp_path / "s.toml", tmp_path, tmp_path, {**SMALL, axis: values})
    if axis == "variant":
        spec.write_text(spec.read_text() + "\n[variants]\na = {lr = 0.1}\nb = {lr = 0.2}\n")
    with pytest.raises(ConfigError) as error:
        StudySpec.load(spec)
    message = str(error.value)
    assert "\n" not in message and f"[grid] {axis}" in message and shown in message and "twice" in message


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
    study = load(directory)
    assert "test_evaluations" not in study.user_attrs and study.user_attrs["selected"]["test"] is None
    text = (directory / "report.md").read_text()
    assert "no test split" in text and "test accuracy" not in text


def test_val_loss_metric_governs_each_trials_best_epoch_value_and_checkpoint(tree, tmp_path):
    import torch

    grid = {"strategy": ["frozen"], "batch_size": [8], "epochs": [3]}
    spec_path = write_spec(
        tmp_path / "s.toml", tree, tmp_path / "cache", grid, top={"metric": "val_loss"}, head="linear", lr=0.3
    )
    directory = run_study(spec_path, study_dir=tmp_path / "out", report=False)
    (trial,) = runs(load(directory))
    losses = [r["val_loss"] for r in trial.user_attrs["history"]]
    assert trial.value == min(losses) and trial.user_attrs["best"]["val_loss"] == min(losses)
    checkpoint = torch.load(directory / trial.user_attrs["checkpoint"], weights_only=True)
    assert checkpoint["metric"] == "val_loss" and checkpoint["val_loss"] == min(losses)


@pytest.mark.parametrize("table", ["run", "grid"])
def test_metric_is_set_once_at_the_top_of_a_spec(tree, tmp_path, table):
    text = f'name = "s"\n[{table}]\nmetric = ' + ('["val_loss"]' if table == "grid" else '"val_loss"') + "\n"
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ConfigError, match="set it once at the top level"):
        StudySpec.load(tmp_path / "s.toml")


# ---------------------------------------------------------------------------- 7. secrets
def test_redaction_of_storage_urls():
    url = f"postgresql+psycopg2://user:{SECRET}@db.example:5432/studies"
    assert SECRET not in redact(url) and "user:***@db.example:5432/studies" in redact(url)
    assert without_password(url) == "postgresql+psycopg2://user@db.example:5432/studies"
    assert hide(f"transferlab study run s.toml --storage {url}", url) == (
        "transferlab study run s.toml --storage postgresql+psycopg2://user:***@db.example:5432/studies"
    )
    quoted = "postgresql://user:p%40ss@h/db"  # the password p@ss, URL-quoted
    assert "p%40ss" not in hide(f"x {quoted}", quoted) and "p@ss" not in hide("p@ss", quoted)
    sqlite = "sqlite:////tmp/x/study.db"
    assert redact(sqlite) == without_password(sqlite) == sqlite and redact("not a url") == "not a url"


def test_password_from_the_environment_variable_the_spec_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_PG_PASSWORD", SECRET)
    url = resolve_url(tmp_path, "postgresql://user@h/db", password_env="MY_PG_PASSWORD")
    assert url == f"postgresql://user:{SECRET}@h/db"
    assert resolve_url(tmp_path, "postgresql://user:given@h/db", password_env="MY_PG_PASSWORD").count("given") == 1
    assert resolve_url(tmp_path, None) == f"sqlite:///{tmp_path.resolve() / 'study.db'}"  # SQLite: no password
    spec = write_spec(tmp_path / "s.toml", tmp_path, tmp_path, SMALL, top={"storage_password_env": "MY_PG_PASSWORD"})
    assert StudySpec.load(spec).storage_password_env == "MY_PG_PASSWORD"


def test_a_password_in_an_unreachable_storage_is_never_shown_or_saved(tree, tmp_path, capsys):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    directory = tmp_path / "out"
    status, err = cli(
        "study", "run", str(spec_path), "--dir", str(directory), "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/x",
        capsys=capsys,
    )  # fmt: skip
    line = assert_one_line_error(status, err)
    assert "u:***@127.0.0.1:1/x" in line
    assert not directory.exists()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES, reason="needs TRANSFERLAB_TEST_POSTGRES_URL (bash .ci/postgres.sh)")
def test_a_password_in_the_storage_url_lands_nowhere(tree, tmp_path, capfd, monkeypatch, database):  # noqa: F811
    """The test server trusts loopback connections, so any password is accepted: it only has to travel."""
    from sqlalchemy.engine import make_url

    url = make_url(database).set(password=SECRET).render_as_string(hide_password=False)
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", {**SMALL, "batch_size": [4, 8]}, name="pw")
    directory = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["transferlab", "study", "run", str(spec_path), "--storage", url])
    status = main(["study", "run", str(spec_path), "--dir", str(directory), "--storage", url, "--workers", "2"])
    out, err = capfd.readouterr()
    assert status == 0, err
    assert SECRET not in out + err
    for path in files_under(directory):
        assert SECRET.encode() not in path.read_bytes(), path
    assert (directory / "storage.txt").read_text().strip().splitlines()[-1] == without_password(url)
    study = load(directory, url=url)
    assert SECRET not in repr(study.user_attrs) and "***" in study.user_attrs["command"]
    assert len(runs(study)) == 2
    assert main(["study", "report", str(directory)]) == 0  # storage.txt has no password: trust auth lets it in


@pytest.mark.postgres
@pytest.mark.skipif(not POSTGRES, reason="needs TRANSFERLAB_TEST_POSTGRES_URL (bash .ci/postgres.sh)")
def test_libpq_takes_the_password_from_pgpassword_and_pgpass(tmp_path, monkeypatch):
    """What storage.txt relies on: a URL without a password gets it the driver's usual ways."""
    from transferlab.study.storage import open_storage

    url = without_password(POSTGRES)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:*:{SECRET}-file\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    for expected in (f"{SECRET}-file", SECRET):
        if expected == SECRET:
            monkeypatch.setenv("PGPASSWORD", SECRET)
        engine = open_storage(url).engine
        connection = engine.raw_connection()
        try:
            assert connection.driver_connection.info.password == expected
        finally:
            connection.close()
            engine.dispose()


# ---------------------------------------------------------------------------- 8, 9. bad storages, one-line errors
@pytest.mark.parametrize("storage", ["nosuch://x", "postgresql://u@127.0.0.1:1/db", "not a url"])
def test_a_bad_storage_is_one_line_and_nothing_is_written(tree, tmp_path, capsys, storage):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    directory = tmp_path / "out"
    status, err = cli("study", "run", str(spec_path), "--dir", str(directory), "--storage", storage, capsys=capsys)
    assert_one_line_error(status, err)
    assert not directory.exists()
    directory.mkdir()  # an existing directory keeps no storage.txt either
    status, err = cli("study", "run", str(spec_path), "--dir", str(directory), "--storage", storage, capsys=capsys)
    assert_one_line_error(status, err)
    assert files_under(directory) == []


def test_report_of_a_missing_directory_or_a_directory_without_a_study_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = cli("study", "report", str(tmp_path / "missing"), capsys=capsys)
    assert "missing" in assert_one_line_error(status, err)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    status, err = cli("study", "report", str(run_dir), capsys=capsys)
    assert "study.db" in assert_one_line_error(status, err)
    assert [p.relative_to(tmp_path) for p in files_under(tmp_path)] == [Path("run/metrics.json")]


@pytest.fixture(scope="module")
def real_db(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("real")
    spec_path = write_spec(root / "s.toml", make_tree(root / "images"), root / "cache", SMALL)
    return (run_study(spec_path, study_dir=root / "out", report=False) / "study.db").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_corrupt_study_db_is_one_line_and_left_as_it_was(tree, tmp_path, capsys, real_db, damage):
    content = real_db[:100] if damage == "truncated" else os.urandom(4096)
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "study.db").write_bytes(content)
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    for argv in (["study", "report", str(directory)], ["study", "run", str(spec_path), "--dir", str(directory)]):
        status, err = cli(*argv, capsys=capsys)
        assert_one_line_error(status, err)
        assert (directory / "study.db").read_bytes() == content
        assert [p.name for p in files_under(directory) if p.suffix != ".lock"] == ["study.db"]


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_below_one_is_one_line(tree, tmp_path, capsys, workers):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    status, err = cli("study", "run", str(spec_path), "--dir", str(tmp_path / "o"), "--workers", workers, capsys=capsys)
    assert "--workers" in assert_one_line_error(status, err)
    assert not (tmp_path / "o").exists()


def test_selecting_an_unfinished_study_is_a_study_error(tree, tmp_path):
    spec = StudySpec.load(write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL))
    study = open_study(spec, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "study.lock")
    with pytest.raises(StudyError, match="not complete"):
        select_and_test(study, spec, tmp_path)
