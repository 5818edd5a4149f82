"""Study storages: passwords never shown or saved, bad storages refused in one line, nothing lost.

- A storage password never lands in a file, a log line, the report or an error message, whether it is in the URL (its
  userinfo or its query), in the environment variable the spec names, or where the driver looks (PGPASSWORD, .pgpass);
  a raw "@" in it is refused with all of it up to the last "@" hidden; a missing driver is named.
- A bad --storage, a missing or corrupt storage, an in-memory SQLite storage and --workers < 1 are one-line errors
  (exit 2) that create nothing and change nothing; `study worker` joins only a study `study run` created.
- A full disk under the storage is one line, and a rerun finishes the study.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import optuna
import pytest
from helpers import (
    NEEDS_POSTGRES,
    POSTGRES_URL,
    assert_one_line_error,
    load_study,
    small_filesystem,
    study_tree,
    write_spec,
)

from transferlab.cli import main
from transferlab.config.study import StudySpec
from transferlab.study.runner import run_study
from transferlab.study.storage import resolve_url
from transferlab.urls import hide, password_of, redact, without_password

COMPLETE = optuna.trial.TrialState.COMPLETE


SMALL = {"strategy": ["frozen"], "batch_size": [8], "epochs": [1]}


SECRET = "s3cr3t-Pa55"


def runs(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials actually trained (kind run, complete)."""
    return [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if t.user_attrs["kind"] == "run"]


def cli(*argv: str, capsys) -> tuple[int, str]:
    """main(argv) -> (status, stderr)."""
    status = main(list(argv))
    return status, capsys.readouterr().err


def refused_hiding_secret(status: int, err: str, *, hidden: str = SECRET) -> str:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferlab: error: "), err
    assert "Traceback" not in err and hidden not in err
    return lines[0]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def tree(tmp_path) -> Path:
    return study_tree(tmp_path / "images")


@pytest.fixture(scope="module")
def real_db(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("real")
    spec_path = write_spec(root / "s.toml", study_tree(root / "images"), root / "cache", SMALL)
    return (run_study(spec_path, study_dir=root / "out", report=False) / "study.db").read_bytes()


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
    line = refused_hiding_secret(status, err)
    assert "u:***@127.0.0.1:1/x" in line
    assert not directory.exists()


@pytest.mark.postgres
@pytest.mark.slow
@NEEDS_POSTGRES
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
    study = load_study(directory, url=url)
    assert SECRET not in repr(study.user_attrs) and "***" in study.user_attrs["command"]
    assert len(runs(study)) == 2
    assert main(["study", "report", str(directory)]) == 0  # storage.txt has no password: trust auth lets it in


@pytest.mark.postgres
@NEEDS_POSTGRES
def test_libpq_takes_the_password_from_pgpassword_and_pgpass(tmp_path, monkeypatch):
    """What storage.txt relies on: a URL without a password gets it the driver's usual ways."""
    from transferlab.study.storage import open_storage

    url = without_password(POSTGRES_URL)
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
    refused_hiding_secret(status, err)
    assert not directory.exists()
    directory.mkdir()  # an existing directory keeps no storage.txt either
    status, err = cli("study", "run", str(spec_path), "--dir", str(directory), "--storage", storage, capsys=capsys)
    refused_hiding_secret(status, err)
    assert files_under(directory) == []


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_corrupt_study_db_is_one_line_and_left_as_it_was(tree, tmp_path, capsys, real_db, damage):
    content = real_db[:100] if damage == "truncated" else os.urandom(4096)
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "study.db").write_bytes(content)
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    for argv in (["study", "report", str(directory)], ["study", "run", str(spec_path), "--dir", str(directory)]):
        status, err = cli(*argv, capsys=capsys)
        refused_hiding_secret(status, err)
        assert (directory / "study.db").read_bytes() == content
        assert [p.name for p in files_under(directory) if p.suffix != ".lock"] == ["study.db"]


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_below_one_is_one_line(tree, tmp_path, capsys, workers):
    spec_path = write_spec(tmp_path / "s.toml", tree, tmp_path / "cache", SMALL)
    status, err = cli("study", "run", str(spec_path), "--dir", str(tmp_path / "o"), "--workers", workers, capsys=capsys)
    assert "--workers" in refused_hiding_secret(status, err)
    assert not (tmp_path / "o").exists()


def test_a_worker_joins_only_an_existing_study(one_point_spec, tmp_path, capsys):
    study_dir = tmp_path / "study"
    assert main(["study", "worker", str(one_point_spec), "--dir", str(study_dir)]) == 2
    assert_one_line_error(capsys.readouterr(), "no study storage")
    assert not study_dir.exists()
    storage = tmp_path / "other.db"
    url = f"sqlite:///{storage}"
    optuna.create_study(study_name="another", storage=url)
    assert main(["study", "worker", str(one_point_spec), "--dir", str(study_dir), "--storage", url]) == 2
    assert_one_line_error(capsys.readouterr(), "no study 's'", "study run")
    assert optuna.get_all_study_names(url) == ["another"]


@pytest.mark.parametrize("password", ["Zq9@tail", "Zq9@ta/il"])
def test_a_raw_at_in_a_storage_password_shows_no_part_of_it(password, one_point_spec, tmp_path, capsys):
    url = f"postgresql+psycopg2://someone:{password}@127.0.0.1:1/db"
    study_dir = tmp_path / "study"
    assert main(["study", "run", str(one_point_spec), "--dir", str(study_dir), "--storage", url]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, "someone:***@127.0.0.1:1/db", "URL-quote it")
    assert "Zq9" not in captured.err and "tail" not in captured.err and "ta/il" not in captured.err
    assert not study_dir.exists()
    assert redact(url) == "postgresql+psycopg2://someone:***@127.0.0.1:1/db"


# ---------------------------------------------------------------------------- lost results
def test_an_in_memory_sqlite_storage_is_refused(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", {"epochs": [1]})
    for url in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out"), "--storage", url]) == 2
        assert_one_line_error(capsys.readouterr(), "in-memory SQLite", "name a file")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- full disks
@pytest.mark.slow
def test_a_really_full_disk_for_the_study_storage_is_one_line_and_a_rerun_finishes(make_tree, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=12, size=16), tmp_path / "cache",
                      {"epochs": [1]}, head="linear")  # fmt: skip
    with small_filesystem(tmp_path / "small", "4m") as small:
        url = f"sqlite:///{small / 'study.db'}"
        args = ["study", "run", str(spec), "--dir", str(tmp_path / "out"), "--storage", url, "--no-report"]
        assert main(args) == 0
        filler = small / "filler"
        with open(filler, "wb") as handle:  # the disk fills up between two runs
            with contextlib.suppress(OSError):
                handle.write(b"\0" * (8 << 20))
        capsys.readouterr()
        assert main([*args, "--set", "grid.epochs=[1, 2]"]) == 2
        assert_one_line_error(capsys.readouterr(), "full", "MB free")
        filler.unlink()
        assert main([*args, "--set", "grid.epochs=[1, 2]"]) == 0  # nothing was lost: the study goes on


# ---------------------------------------------------------------------------- secrets
@pytest.mark.parametrize(
    "url, secret, password",
    [
        ("postgresql+psycopg2://u@127.0.0.1:1/db?password=Sekr3t%40x", "Sekr3t@x", "Sekr3t@x"),
        ("postgresql+psycopg2://u@127.0.0.1:1/db?sslmode=disable&PASSWORD=Sekr3t", "Sekr3t", "Sekr3t"),
        ("postgresql+psycopg2://u@127.0.0.1:1/db?sslpassword=Sekr3t", "Sekr3t", None),
        ("mysql+pymysql://u@127.0.0.1:1/db?passwd=Sekr3t", "Sekr3t", "Sekr3t"),
        ("postgresql+psycopg2://u:Sekr3t@127.0.0.1:1/db?token=Sekr3t", "Sekr3t", "Sekr3t"),
    ],
)
def test_a_credential_in_a_url_query_is_never_shown_or_saved(url, secret, password):
    for text in (redact(url), without_password(url), hide(f"--storage {url} and {secret}", url)):
        assert secret not in text and "Sekr3t" not in text and "Sekr3t%40x" not in text
    assert "***" in redact(url) and "127.0.0.1:1/db" in redact(url) and "127.0.0.1:1/db" in without_password(url)
    assert password_of(url) == password  # handed to worker processes through the environment, never argv


def test_a_query_password_stays_out_of_the_error_and_storage_txt(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", {"epochs": [1]})
    url = "postgresql+psycopg2://someone@127.0.0.1:1/db?password=Sekr3t&connect_timeout=2"
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out"), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "Sekr3t" not in err and "password=***" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "storage.txt").exists()


def test_resolve_url_keeps_a_query_password_as_the_password():
    url = resolve_url(Path("/tmp"), "postgresql+psycopg2://u@h/db?password=p1", password_env=None)
    assert password_of(url) == "p1"


# ---------------------------------------------------------------------------- found by a hostile tester
def test_database_urls_name_a_missing_driver_and_hide_odd_passwords(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", {"epochs": [1]})
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "o"), "--storage", "postgresql://u@127.0.0.1:1/d"])
    captured = capsys.readouterr()
    assert_one_line_error(captured, "driver psycopg is not installed", "postgresql+psycopg2://")
    for url in (
        "postgresql+psycopg2://u@h:1/db?options=-c%20password%3DSekr3t",
        "postgresql+psycopg2://u@h:1/db;password=Sekr3t",
    ):
        assert "Sekr3t" not in redact(url) and "Sekr3t" not in without_password(url)
        assert "Sekr3t" not in hide(f"error in {url}", url)
