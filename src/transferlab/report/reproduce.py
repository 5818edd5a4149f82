"""The Reproduce section: the command, the spec with its paths made absolute (as TOML), software and data."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..config.identity import PATH_FIELDS
from ..engine.rundir import RunDir
from ..study.records import TrialRecord
from ..urls import without_password
from ..version import build_info
from .data import Block, StudyData
from .format import _selected_trial

# ------------------------------------------------------------------------------ reproduce


def run_from(data: StudyData) -> tuple[Path, str]:
    """The directory relative paths of the spec are relative to, and how it is known."""
    if data.record.cwd:
        return Path(data.record.cwd), "the directory the study was run from"
    # studies recorded before the directory was: the default layout <cwd>/studies-out/<name>, if the data is there
    data_path = str(data.spec.get("run", {}).get("data", ""))
    if data.directory is not None and data_path and data_path != "cifar10":
        guess = data.directory.resolve().parent.parent
        if (guess / data_path).exists():
            return guess, "not recorded; the study directory's grandparent (the default layout), where the data is"
    return Path.cwd(), "not recorded; the current directory"


def _absolute(value: str, data: StudyData) -> str:
    """A path as recorded, made absolute against the directory the study was run from."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return str((run_from(data)[0] / path).resolve())


def _absolute_paths(table: dict, data: StudyData) -> dict:
    out = {}
    for key, value in table.items():
        fix = key in PATH_FIELDS and isinstance(value, str) and value not in PATH_FIELDS[key]
        if key in PATH_FIELDS and isinstance(value, list):
            out[key] = [_absolute(v, data) if isinstance(v, str) and v not in PATH_FIELDS[key] else v
                        for v in value]  # fmt: skip
        else:
            out[key] = _absolute(value, data) if fix else value
    return out


def reproducible_spec(data: StudyData) -> dict:
    """The recorded spec with its data, weights and cache paths absolute."""
    tree = dict(data.spec)
    if isinstance(tree.get("storage"), str):  # its password, if any, comes from the environment (never printed)
        tree["storage"] = without_password(tree["storage"])
    for name in ("run", "grid"):
        if isinstance(tree.get(name), dict):
            tree[name] = _absolute_paths(tree[name], data)
    if isinstance(tree.get("variants"), dict):
        tree["variants"] = {k: _absolute_paths(v, data) for k, v in tree["variants"].items()}
    return tree


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # inf, -inf, nan: as TOML writes them
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(tree: dict, prefix: str = "") -> str:
    """A spec tree as TOML: scalars and arrays first, then a [table] per nested table. None (unset) is left out."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in tree.items() if v is not None and not isinstance(v, dict)]
    for key, value in tree.items():
        if isinstance(value, dict):
            name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
            body = to_toml(value, name)
            lines += ["", f"[{name}]", *([body] if body else [])]
    return "\n".join(lines).strip("\n")


def reproduce_blocks(data: StudyData) -> list[Block]:
    blocks = [Block("h2", "Reproduce")]
    blocks.append(Block("p", "The command that ran the study (passwords hidden):"))
    blocks.append(Block("code", data.command or "(command not recorded)"))
    base, how = run_from(data)
    blocks.append(
        Block(
            "p",
            f"The spec as the study recorded it (overrides applied), relative paths made absolute against {base} "
            f"({how}); save it as spec.toml and run `transferlab study run spec.toml`:",
        )
    )
    blocks.append(Block("code", to_toml(reproducible_spec(data))))
    rows = [["", "value"]]
    ran = data.record.software or {}
    if ran:
        rows.append(["transferlab that ran the study", ran.get("version", "")])
        if ran.get("commit"):
            rows.append(["its git commit", ran["commit"]])
    now = build_info()
    rows.append(["transferlab that wrote this report", now["version"]])
    if now.get("commit"):
        rows.append(["its git commit", now["commit"]])
    rows.append(["report written", time.strftime("%Y-%m-%d %H:%M:%S %Z")])
    if data.record.last_run:
        rows.append(["last study run", f"{data.record.last_run['started']} to {data.record.last_run['finished']}"])
    trial = _selected_trial(data) or (data.trials[0] if data.trials else None)
    if trial:
        config = trial.config
        source = config.get("labels") or config.get("data", "")
        rows.append(["data source", source if source == "cifar10" else _absolute(source, data)])
        rows.append(["data fingerprint", _data_key(data, trial)])
    blocks.append(Block("table", rows=rows))
    if data.environment:
        blocks.append(Block("table", rows=[["environment", ""]] + [[k, str(v)] for k, v in data.environment.items()]))
    return blocks


def _data_key(data: StudyData, trial: TrialRecord) -> str:
    if data.directory is None or not trial.run_dir:
        return "not recorded"
    metrics = RunDir(data.directory / trial.run_dir).metrics() or {}
    return str(metrics.get("data", "not recorded"))
