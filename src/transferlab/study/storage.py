"""The study storage, shared by the study runner and the report: which URL (storage.txt, --storage, the spec), opened
how, with one-line errors.

Where a password comes from, first found wins: the URL itself (urls.py keeps it out of everything shown or saved),
the environment variable the spec names (storage_password_env), TRANSFERLAB_STORAGE_PASSWORD (how `study run
--workers N` hands it to its worker processes), then the database driver's own ways (PGPASSWORD, ~/.pgpass).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StudyError, first_line
from ..fsutil import atomic_write_text, free_bytes
from ..urls import hide, parse, password_of, redact, sqlite_file, sqlite_url, unquoted_at, without_password

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

PASSWORD_ENV = "TRANSFERLAB_STORAGE_PASSWORD"


def _with_password(url: str, password_env: str | None) -> str:
    parsed = parse(url)
    if parsed is None or password_of(url) is not None or not parsed.host:
        return url
    for name in (password_env, PASSWORD_ENV):
        if name and os.environ.get(name):
            return parsed.set(password=os.environ[name]).render_as_string(hide_password=False)
    return url


def default_url(directory: Path) -> str:
    return sqlite_url(Path(directory).resolve() / "study.db")


STORAGE_FILE_HEADER = "# transferlab study storage, format 2: a URL, or folder:PATH for a SQLite file in this folder"


def save_url(directory: Path, url: str) -> None:
    """storage.txt, for reruns and `study report DIR`, for a storage other than the directory's own study.db. A SQLite
    file inside the directory is saved relative to it, any other as an absolute path: a copied or moved directory
    goes on using its own files, never the original's, and shared storage stays shared."""
    saved, folder = Path(directory) / "storage.txt", Path(directory).resolve()
    named = sqlite_file(url)
    if named is not None and named.resolve() == folder / "study.db":
        saved.unlink(missing_ok=True)
        return
    if named is None:
        text = without_password(url)
    elif named.resolve().is_relative_to(folder):
        text = f"folder:{named.resolve().relative_to(folder)}"
    else:
        text = parse(url).set(database=str(named.resolve())).render_as_string(hide_password=False)  # keeps a query
    atomic_write_text(f"{STORAGE_FILE_HEADER}\n{text}\n", saved, "the storage file")


def save_study_name(directory: Path, name: str) -> None:
    """study.txt: which study of a (possibly shared) storage this directory's reruns and reports are about."""
    atomic_write_text(name, Path(directory) / "study.txt", "the study name file")


def saved_study_name(directory: Path) -> str | None:
    saved = Path(directory) / "study.txt"
    return saved.read_text().strip() if saved.is_file() else None


def _saved_url(saved: Path, directory: Path) -> str:
    lines = [line.strip() for line in saved.read_text().splitlines() if line.strip()]
    if lines and lines[0] == STORAGE_FILE_HEADER:
        url = lines[-1]
        return sqlite_url(Path(directory).resolve() / url[len("folder:") :]) if url.startswith("folder:") else url
    url = lines[-1] if lines else ""
    # An older transferlab saved the directory's own study.db here too: in a copy it names the original's
    named, own = sqlite_file(url), Path(directory).resolve() / "study.db"
    if named is not None and named.name == "study.db" and named.resolve() != own and own.is_file():
        raise StudyError(
            f"{saved} names {named}, but {directory} holds its own study.db (a copied or moved study folder?): "
            f"delete {saved} to use this folder's, or pass --storage"
        )
    return url


def resolve_url(
    directory: Path, storage: str | None, spec_storage: str | None = None, password_env: str | None = None
) -> str:
    """--storage, else the spec's storage, else the directory's storage.txt, else SQLite in the directory."""
    saved = Path(directory) / "storage.txt"
    if storage or spec_storage:
        url = storage or spec_storage
    elif saved.is_file():
        url = _saved_url(saved, directory)
    else:
        url = default_url(directory)
    if unquoted_at(parse(url)):  # its host would be the password's tail, shown in every error
        raise StudyError(f"storage {redact(url)}: the password holds a raw '@'; URL-quote it (%40)")
    parsed = parse(url)
    if parsed is not None and parsed.get_backend_name() == "sqlite" and sqlite_file(url) is None:
        raise StudyError(
            f"storage {redact(url)}: an in-memory SQLite database ends with the process and the study with it; name a "
            "file (sqlite:///path/study.db) or leave --storage out (the study directory's study.db)"
        )
    return _with_password(url, password_env)


# ------------------------------------------------------------------------------ opening
@contextlib.contextmanager
def storage_errors(url: str):
    """Database errors as one-line StudyErrors naming the storage, its password hidden."""
    from optuna.exceptions import StorageInternalError  # loaded when a storage is used: --help stays light
    from sqlalchemy.exc import SQLAlchemyError  # as above

    try:
        yield
    except (SQLAlchemyError, StorageInternalError) as error:
        cause = error.__cause__ if isinstance(error, StorageInternalError) and error.__cause__ else error
        text = hide(first_line(cause), url)
        named = sqlite_file(url)
        if named is not None and "full" in text.lower():  # SQLite: "database or disk is full"
            text += f" ({free_bytes(named.parent) / 2**20:,.1f} MB free beside {named}: free some space and run again)"
        raise StudyError(f"storage {redact(url)}: {text}") from None


def require_existing(url: str) -> None:
    """A SQLite storage file must exist to be read: opening a missing one would create an empty study.db."""
    named = sqlite_file(url)
    if named is not None and not named.is_file():
        raise StudyError(f"no study storage: {named} does not exist")


def lock_path(url: str, directory: Path) -> Path:
    """Where processes take turns on a storage: beside a SQLite file (whichever directories use it), else in the
    study directory (processes of this machine; workers elsewhere are covered by pruning duplicate claims)."""
    named = sqlite_file(url)
    return Path(f"{named}.lock") if named is not None else Path(directory) / "study.lock"


def open_storage(url: str, **heartbeat: Any) -> RDBStorage:
    """An Optuna RDB storage; an invalid, unreachable or corrupt one is a one-line StudyError."""
    import optuna  # loaded when a storage is opened: --help stays light
    from optuna.storages import RDBStorage  # as above

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are documented
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except Exception as error:  # a bad URL, a missing driver, no server, not a database: all say why in one line
        missing = _missing_driver(url)
        why = hide(first_line(error), url) if missing is None else missing
        raise StudyError(f"cannot open the storage {redact(url)}: {why}") from None


def _missing_driver(url: str) -> str | None:
    """Which database driver a URL needs and lacks, in words (None: its driver imports, or it is no database URL)."""
    parsed = parse(url)
    if parsed is None:
        return None
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as error:
        text = f"its driver {error.name or parsed.get_driver_name()} is not installed"
        if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg2":
            text += " (with psycopg2 installed, write postgresql+psycopg2://...)"
        return text
    except Exception:  # noqa: BLE001 - an unknown dialect: the storage's own message says it
        return None
    return None
