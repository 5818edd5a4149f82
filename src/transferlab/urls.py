"""Database URLs and the secrets in them: parsed once, shown and saved without a password, ever.

A storage URL may carry a password (postgresql://user:PASSWORD@host/db, or a query parameter such as ?password=).
It stays in memory: what is saved (storage.txt), logged, recorded in a study, put in a report or an error message
goes through `redact`, `without_password` or `hide`. Used by the study storage and by MLflow tracking alike.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from sqlalchemy.engine import URL, make_url


# ------------------------------------------------------------------------------ URLs and their passwords
def parse(url: str):
    """The URL parsed by SQLAlchemy, or None when it is none."""
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
    parsed = parse(url)
    if parsed is None:
        return None
    if parsed.password is not None:
        return parsed.password
    query = {k.lower(): v for k, v in _credential_query(parsed).items()}
    return next((query[k][0] for k in PASSWORD_KEYS if k in query), None)


def secrets_of(url: str) -> list[str]:
    """Every secret the URL holds: its password and each credential query parameter's value."""
    parsed = parse(url)
    found = [parsed.password] if parsed is not None and parsed.password else []
    return found + [v for values in _credential_query(parsed).values() for v in values if v]


def unquoted_at(parsed) -> bool:
    """A password typed with a raw '@' (user:p@ss@host, user:p@s/s@host): the URL parser takes its tail for the host
    or the database, where every error message would show it."""
    if parsed is None or parsed.password is None:
        return False
    return "@" in (parsed.host or "") or "@" in (parsed.database or "")


def redact(url: str) -> str:
    """The URL as it may be shown: its password and credential query parameters replaced by ***."""
    return ASSIGNED.sub(r"\1\2***", _redact(url))


def _redact(url: str) -> str:
    parsed = parse(url)
    if parsed is None:
        return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)
    if unquoted_at(parsed):  # everything up to the last '@' may be the password
        return re.sub(r"(://[^/:@]*:).*@", r"\1***@", url)
    credentials = _credential_query(parsed)
    if credentials:  # a placeholder the URL would escape, swapped for *** once rendered
        parsed = parsed.update_query_dict({k: "REDACTED" for k in credentials})
    shown = parsed.render_as_string(hide_password=True) if parsed.password is not None or credentials else url
    return shown.replace("=REDACTED", "=***")


def without_password(url: str) -> str:
    """The URL as it may be saved: no password or credential query parameter at all (later runs get the password
    from the environment)."""
    parsed = parse(url)
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


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file, its path escaped: in a plain f"sqlite:///{path}" a '?' in a folder's name would start
    the query and a '%41' be read as 'A', so another file would be opened."""
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def sqlite_file(url: str) -> Path | None:
    parsed = parse(url)
    if parsed is None or parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)
