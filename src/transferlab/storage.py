"""The study storage, shared by the study runner and the report: which URL, opened how, which trials count.

A storage URL may carry a password (postgresql://user:PASSWORD@host/db). It stays in memory: what is
saved (storage.txt), logged, recorded in the study, put in a report or an error message has it removed.
Where the password comes from, first found wins: the URL itself, the environment variable the spec
names (storage_password_env), TRANSFERLAB_STORAGE_PASSWORD (how `study run --workers N` hands it to
its worker processes), then the database driver's own ways (PGPASSWORD, ~/.pgpass for PostgreSQL).

Which trials count: `run_study` records the identities of the current spec's grid points in the study
user attr "identities"; complete trials of other identities (earlier specs) stay in the storage and are
neither selected nor reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import first_line

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage

PASSWORD_ENV = "TRANSFERLAB_STORAGE_PASSWORD"
RUN_KINDS = ("run", "derived")


class StudyError(RuntimeError):
    """A study cannot be run or reported as asked (message is one line)."""


# ------------------------------------------------------------------------------ URLs and their passwords
def _parse(url: str):
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except Exception:  # not a URL at all: nothing to take a password from
        return None


# Query parameters that carry a secret: psycopg2's password / sslpassword, MySQL drivers' passwd, ODBC's PWD, tokens
CREDENTIAL = re.compile(r"pass|pwd|secret|token|credential|api_?key", re.IGNORECASE)
PASSWORD_KEYS = ("password", "passwd", "pwd")  # a query parameter that is the password itself
# password=... inside another parameter's value or a database name (?options=-c password=x, db;password=x)
ASSIGNED = re.compile(r"(pass(?:word|wd)?|pwd|secret|token)(=|%3D|%3d)[^&;\s@/]+", re.IGNORECASE)


def _credential_query(parsed) -> dict[str, tuple[str, ...]]:
    """The URL's query parameters that hold secrets (by name, or a password=... in the value), each with its values."""
    if parsed is None:
        return {}
    found = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in parsed.query.items()}
    return {k: v for k, v in found.items() if CREDENTIAL.search(k) or any(ASSIGNED.search(x) for x in v)}


def password_of(url: str) -> str | None:
    """The URL's password: its user-info part, else a password query parameter (?password=...)."""
    parsed = _parse(url)
    if parsed is None:
        return None
    if parsed.password is not None:
        return parsed.password
    query = {k.lower(): v for k, v in _credential_query(parsed).items()}
    return next((query[k][0] for k in PASSWORD_KEYS if k in query), None)


def secrets_of(url: str) -> list[str]:
    """Every secret the URL holds: its password and each credential query parameter's value."""
    parsed = _parse(url)
    found = [parsed.password] if parsed is not None and parsed.password else []
    return found + [v for values in _credential_query(parsed).values() for v in values if v]


def _unquoted_at(parsed) -> bool:
    """A password typed with a raw '@' (user:p@ss@host, user:p@s/s@host): the URL parser takes its tail for the host
    or the database, where every error message would show it."""
    if parsed is None or parsed.password is None:
        return False
    return "@" in (parsed.host or "") or "@" in (parsed.database or "")


def redact(url: str) -> str:
    """The URL as it may be shown: its password and credential query parameters replaced by ***."""
    return ASSIGNED.sub(r"\1\2***", _redact(url))


def _redact(url: str) -> str:
    parsed = _parse(url)
    if parsed is None:
        return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)
    if _unquoted_at(parsed):  # everything up to the last '@' may be the password
        return re.sub(r"(://[^/:@]*:).*@", r"\1***@", url)
    credentials = _credential_query(parsed)
    if credentials:  # a placeholder the URL would escape, swapped for *** once rendered
        parsed = parsed.update_query_dict({k: "REDACTED" for k in credentials})
    shown = parsed.render_as_string(hide_password=True) if parsed.password is not None or credentials else url
    return shown.replace("=REDACTED", "=***")


def without_password(url: str) -> str:
    """The URL as it may be saved: no password or credential query parameter at all (later runs get the password
    from the environment)."""
    parsed = _parse(url)
    credentials = _credential_query(parsed)
    if parsed is None or (parsed.password is None and not credentials):
        return ASSIGNED.sub(r"\1\2***", url)
    if credentials:
        parsed = parsed.difference_update_query(credentials)
    return ASSIGNED.sub(r"\1\2***", parsed._replace(password=None).render_as_string(hide_password=False))


def hide(text: str, url: str) -> str:
    """`text` with the URL's secrets, as typed or URL-quoted, replaced by ***."""
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}:
            text = text.replace(form, "***")
    return ASSIGNED.sub(r"\1\2***", text) if ASSIGNED.search(url) else text


def _with_password(url: str, password_env: str | None) -> str:
    parsed = _parse(url)
    if parsed is None or password_of(url) is not None or not parsed.host:
        return url
    for name in (password_env, PASSWORD_ENV):
        if name and os.environ.get(name):
            return parsed.set(password=os.environ[name]).render_as_string(hide_password=False)
    return url


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file, its path escaped: in a plain f"sqlite:///{path}" a '?' in a folder's name would start
    the query and a '%41' be read as 'A', so another file would be opened."""
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def default_url(directory: Path) -> str:
    return sqlite_url(Path(directory).resolve() / "study.db")


STORAGE_FILE_HEADER = "# transferlab study storage, format 2: a URL, or folder:PATH for a SQLite file in this folder"


def save_url(directory: Path, url: str) -> None:
    """storage.txt, for reruns and `study report DIR`, for a storage other than the directory's own study.db. A SQLite
    file inside the directory is saved relative to it, any other as an absolute path: a copied or moved directory
    goes on using its own files, never the original's, and shared storage stays shared."""
    saved, folder = Path(directory) / "storage.txt", Path(directory).resolve()
    named = _sqlite_file(url)
    if named is not None and named.resolve() == folder / "study.db":
        saved.unlink(missing_ok=True)
        return
    if named is None:
        text = without_password(url)
    elif named.resolve().is_relative_to(folder):
        text = f"folder:{named.resolve().relative_to(folder)}"
    else:
        text = _parse(url).set(database=str(named.resolve())).render_as_string(hide_password=False)  # keeps a query
    saved.write_text(f"{STORAGE_FILE_HEADER}\n{text}\n")


def _sqlite_file(url: str) -> Path | None:
    parsed = _parse(url)
    if parsed is None or parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _saved_url(saved: Path, directory: Path) -> str:
    lines = [line.strip() for line in saved.read_text().splitlines() if line.strip()]
    if lines and lines[0] == STORAGE_FILE_HEADER:
        url = lines[-1]
        return sqlite_url(Path(directory).resolve() / url[len("folder:") :]) if url.startswith("folder:") else url
    url = lines[-1] if lines else ""
    # An older transferlab saved the directory's own study.db here too: in a copy it names the original's
    named, own = _sqlite_file(url), Path(directory).resolve() / "study.db"
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
    if _unquoted_at(_parse(url)):  # its host would be the password's tail, shown in every error
        raise StudyError(f"storage {redact(url)}: the password holds a raw '@'; URL-quote it (%40)")
    parsed = _parse(url)
    if parsed is not None and parsed.get_backend_name() == "sqlite" and _sqlite_file(url) is None:
        raise StudyError(
            f"storage {redact(url)}: an in-memory SQLite database ends with the process and the study with it; name a "
            "file (sqlite:///path/study.db) or leave --storage out (the study directory's study.db)"
        )
    return _with_password(url, password_env)


# ------------------------------------------------------------------------------ opening
@contextlib.contextmanager
def storage_errors(url: str):
    """Database errors as one-line StudyErrors naming the storage, its password hidden."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, StorageInternalError) as error:
        cause = error.__cause__ if isinstance(error, StorageInternalError) and error.__cause__ else error
        text = hide(first_line(cause), url)
        named = _sqlite_file(url)
        if named is not None and "full" in text.lower():  # SQLite: "database or disk is full"
            from .fsutil import free_bytes

            text += f" ({free_bytes(named.parent) / 2**20:,.1f} MB free beside {named}: free some space and run again)"
        raise StudyError(f"storage {redact(url)}: {text}") from None


def require_existing(url: str) -> None:
    """A SQLite storage file must exist to be read: opening a missing one would create an empty study.db."""
    named = _sqlite_file(url)
    if named is not None and not named.is_file():
        raise StudyError(f"no study storage: {named} does not exist")


def lock_path(url: str, directory: Path) -> Path:
    """Where processes take turns on a storage: beside a SQLite file (whichever directories use it), else in the
    study directory (processes of this machine; workers elsewhere are covered by pruning duplicate claims)."""
    named = _sqlite_file(url)
    return Path(f"{named}.lock") if named is not None else Path(directory) / "study.lock"


def open_storage(url: str, **heartbeat: Any) -> RDBStorage:
    """An Optuna RDB storage; an invalid, unreachable or corrupt one is a one-line StudyError."""
    import optuna
    from optuna.storages import RDBStorage

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
    parsed = _parse(url)
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


# ------------------------------------------------------------------------------ the current spec's trials
def current_identities(study: optuna.Study) -> set[str] | None:
    """The identities of the current spec's grid points (None: a study recorded before identities existed)."""
    identities = study.user_attrs.get("identities")
    return set(identities) if identities is not None else None


def _complete_grid_trials(study: optuna.Study) -> list:
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("kind") in RUN_KINDS
    ]


def grid_trials(study: optuna.Study, identities: set[str] | None = None) -> list:
    """One complete trial per grid point of the current spec (the newest, should a point have been completed twice)."""
    identities = identities if identities is not None else current_identities(study)
    latest = {}
    for t in _complete_grid_trials(study):
        if identities is None or t.user_attrs.get("identity") in identities:
            latest[t.user_attrs["key"]] = t
    return list(latest.values())


def older_trials(study: optuna.Study, identities: set[str] | None = None) -> int:
    """How many complete trials belong to earlier specs (kept in the storage, not selected, not reported)."""
    identities = identities if identities is not None else current_identities(study)
    if identities is None:
        return 0
    return sum(t.user_attrs.get("identity") not in identities for t in _complete_grid_trials(study))
