"""Whether a study's workers are alive: heartbeats (Optuna's), and, on this machine, whether a trial's own process
has ended (killed: its trial is queued again at once rather than after the heartbeat's grace period)."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..errors import ConfigError
from ..progress import log
from .records import TrialRecord

HEARTBEAT_SECONDS = 5
# A live trial whose heartbeat is older than this is taken for dead and re-queued: well above a SQLite lock wait
# (60 s) and other stalls. TRANSFERLAB_HEARTBEAT_GRACE overrides it.
GRACE_SECONDS = 180
GRACE_ENV = "TRANSFERLAB_HEARTBEAT_GRACE"
RUNNING = TrialState.RUNNING


def grace_seconds() -> float:
    text = os.environ.get(GRACE_ENV)
    if text is None:
        return GRACE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= HEARTBEAT_SECONDS:
        raise ConfigError(f"{GRACE_ENV}={text!r}: expected seconds above the heartbeat interval ({HEARTBEAT_SECONDS})")
    return value


def _process_stat(pid: int | str) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process from /proc, or None where there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (name) ": the name may hold spaces and parentheses
    return fields[0], fields[19]


def process_identity() -> dict:
    """This process as a later process can recognise it: host name, boot, pid namespace, pid and start time."""

    def read(path: str, link: bool = False) -> str | None:
        try:
            return os.readlink(path) if link else Path(path).read_text().strip()
        except OSError:  # no /proc (not Linux): such owners are never taken for gone
            return None

    stat = _process_stat("self")
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": read("/proc/self/ns/pid", link=True), "pid": os.getpid(),
            "started": stat[1] if stat else None}  # fmt: skip


def owner_is_gone(owner: dict | None) -> bool:
    """True only when `owner` (process_identity) certainly ran on this machine since its last boot, in this pid
    namespace, and has ended: no process has its pid, or a zombie (killed, not yet reaped by its parent), or one
    started at another time (the pid reused). Anything less certain is left to the heartbeat."""
    here = process_identity()
    if not owner or any(here[k] is None or owner.get(k) != here[k] for k in ("host", "boot", "pid_namespace")):
        return False
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    stat = _process_stat(pid)
    if stat is None:  # not in /proc: ended, unless /proc hides other users' processes (hidepid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # there, but not ours to signal
            pass
        return False
    state, started = stat
    return state in ("Z", "X") or (owner.get("started") is not None and started != owner["started"])


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail the running trials whose process is gone (owner_is_gone: killed on this machine) and queue them again at
    once, as fail_stale_trials does after the heartbeat's grace period. The trial numbers failed."""
    storage = study._storage  # what optuna's own fail_stale_trials uses
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
        owner = TrialRecord.of(trial).owner or {}
        # a retry inherits its failed trial's attributes: an owner counts only once its claimant has written its own
        if owner.get("trial") != trial.number or not owner_is_gone(owner):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # another process failed or finished it first
            continue
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial in failed:
        log(f"trial {trial.number}: its process ({TrialRecord.of(trial).owner['pid']}) is gone; queued again")
        if retry is not None:
            retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return [t.number for t in failed]
