"""What a configuration is, as far as results go: each config field's section and role, and one fingerprint helper.

Every cache key and identity in transferlab is `fingerprint(...)` of plain values: the decode cache, the feature
cache, a run's resume identity, a study trial's identity, an lr range test's finding and a search's name. What a
config contributes to them is `identity(config, ...)`, read from the field declarations (config/run.py: each field
names its section and role), never from a hand-kept list: a field added later joins every identity it should.

Roles: "result" changes a run's numbers; "record" changes what a run records but not its numbers (record_epochs);
"runtime" changes neither (where caches live, whether a bar is drawn, where a run is also logged, which preset named
the options: a preset and the same options spelt out are one run, one trial, one cache entry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

# A run config's sections, in the order `train --help` shows them
SECTIONS = ("data", "split", "model", "augment", "optim", "schedule", "execution")
ROLES = ("result", "record", "runtime")
# Path options (whose spelling does not matter: ./data/../data is data), and the values of each that are no paths
PATH_FIELDS = {"data": ("cifar10",), "labels": (), "data_dir": (), "cache_dir": (), "weights": ("imagenet", "none")}


def fingerprint(value: Any, length: int = 16) -> str:
    """The one fingerprint: sha256 of the canonical JSON of `value` (keys sorted; other values as their str)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fields_of(config, sections=SECTIONS, roles=("result",)) -> list[dataclasses.Field]:
    """The config's fields of these sections and roles, in declaration order."""
    return [
        f for f in dataclasses.fields(config)
        if f.metadata.get("section") in sections and f.metadata.get("role", "result") in roles
    ]  # fmt: skip


def identity(config, sections=SECTIONS, roles=("result",), leave_out=()) -> dict[str, Any]:
    """{field: value} of the config's fields of these sections and roles (but `leave_out`), path options in one
    spelling. The config should have its backbone's defaults filled in (models.resolve), so that an option left to
    its default and the same value given are one identity."""
    return {f.name: _one_spelling(f.name, getattr(config, f.name)) for f in fields_of(config, sections, roles)
            if f.name not in leave_out and not _added_and_unset(f, config)}  # fmt: skip


def _added_and_unset(f: dataclasses.Field, config) -> bool:
    """An option added after runs were recorded (declared `added`), at its default: left out, so that every identity
    recorded before it stays the same."""
    return f.metadata.get("added", False) and getattr(config, f.name) == f.default


def _one_spelling(key: str, value):
    if key not in PATH_FIELDS or not isinstance(value, str) or value in PATH_FIELDS[key]:
        return value
    return os.path.abspath(os.path.expanduser(value))
