"""A study: every grid point a trial in an Optuna storage; workers; resume; selection; one test evaluation.

Storage layout (Optuna, SQLite in the study directory by default, any RDB URL to share):
  study user attrs   spec (the resolved TOML tree), spec_path, command, identities (the current spec's grid
                     points), selected (the selected trial; with replicates its configuration too), test_evaluations,
                     lr_found (the current spec's lr = "find" findings: label, key, lr), lr_find:<hash> (one lr range
                     test: curve, suggestion)
  one trial per job  user attrs: kind="run", key, point, record (epochs recorded), identity, identities (of each
                     recorded grid point), job, config, history, best, checkpoint, cost (cost.py: parameters,
                     FLOPs/image, training and inference images/s; measured once per run)
  derived trials     kind="derived": a grid point whose epochs are a prefix of a longer job's run
  searches           a spec with [search] queues no grid point: each starts an Optuna search of its own, in an
                     Optuna study of its own in the same storage (search.py; study user attr "searches")

A trial's identity is its grid point plus a hash of everything that trains it (the run config, the data's
fingerprint, the pretrained weights): a changed spec trains the changed points and reuses the others.
Jobs: grid points that differ only in `epochs`, under a schedule that ignores the total epoch count,
are one run recorded at each requested epoch (the study's 50/150/300 become one 300-epoch run).
Workers claim waiting trials through Optuna's queue, which pops them atomically; a heartbeat marks
the trials of a dead worker failed and re-queues them; their run directory's state.pt lets the
retry continue from the last finished epoch. A claimed trial whose job another trial has finished or
claimed first (two `study run` queued it twice) is pruned as a duplicate, not trained again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from .config import ConfigError, RunConfig, StudySpec, configuration_of, higher_is_better
from .data import ImageSet, load_images, storage_size_for
from .features import FeatureCache
from .fsutil import exclusive
from .progress import console
from .selection import Tie, best_group, best_trial
from .stats import percent, percent_with_interval
from .storage import (
    PASSWORD_ENV,
    RUN_KINDS,
    StudyError,
    current_identities,
    default_url,
    grid_trials,
    hide,
    lock_path,
    open_storage,
    password_of,
    redact,
    require_existing,
    resolve_url,
    save_url,
    storage_errors,
    without_password,
)
from .version import build_info

__all__ = ["StudyError", "grid_trials", "plan_jobs", "point_key", "run_study", "run_worker", "slug"]

HEARTBEAT_SECONDS = 5
# A live trial whose heartbeat is older than this is taken for dead and re-queued: well above a SQLite lock wait
# (60 s) and other stalls. TRANSFERLAB_HEARTBEAT_GRACE overrides it.
GRACE_SECONDS = 180
GRACE_ENV = "TRANSFERLAB_HEARTBEAT_GRACE"
NOT_TRAINING = ("progress", "cache_dir", "record_epochs")  # RunConfig fields that cannot change a trial's result
WAITING, RUNNING, COMPLETE = TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE


def log(text: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)


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
        owner = trial.user_attrs.get("owner") or {}
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
        log(f"trial {trial.number}: its process ({trial.user_attrs['owner']['pid']}) is gone; queued again")
        if retry is not None:
            retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return [t.number for t in failed]


# ------------------------------------------------------------------------------ jobs
def point_key(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={point[k]}" for k in sorted(point))


def slug(key: str, identity: str) -> str:
    """A run directory's name: the key, readable and truncated, then a hash of the identity (unique)."""
    readable = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", key).replace(",", "__")[:120]
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def trial_identity(point: dict[str, Any], config: RunConfig, data_key: str) -> str:
    """The grid point plus a hash of everything that trains it: the run config, the data, the pretrained weights."""
    return f"{point_key(point)}#{training_hash(config, data_key)}"


def training_hash(config: RunConfig, data_key: str, leave_out=(), **extra) -> str:
    """A hash of everything that trains `config` but the fields in `leave_out`, and of `extra`."""
    from .models import weights_identity

    trains = {k: v for k, v in config.training_dict().items() if k not in NOT_TRAINING and k not in leave_out}
    blob = json.dumps(
        {"config": trains, "data": data_key, "weights": weights_identity(config.arch, config.weights), **extra},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Job:
    point: dict[str, Any]  # the grid point actually trained (the longest epochs of its family)
    record: list[int]  # epochs at which a grid point is recorded
    identities: dict[int, str] = field(default_factory=dict)  # recorded epochs -> that grid point's identity
    config: dict[str, Any] = field(default_factory=dict)  # the RunConfig it trains, as queued

    @property
    def key(self) -> str:
        return point_key(self.point)

    @property
    def identity(self) -> str:
        return self.identities[self.record[-1]]

    @property
    def job_id(self) -> str:
        """Two trials of one job_id are the same training."""
        return f"{self.identity}@{','.join(map(str, self.record))}"

    def recorded_point(self, epochs: int) -> dict[str, Any]:
        return self.point if epochs == self.record[-1] else {**self.point, "epochs": epochs}

    def attrs(self) -> dict[str, Any]:
        identities = {str(e): i for e, i in self.identities.items()}
        return {"key": self.key, "point": self.point, "record": self.record, "identity": self.identity,
                "identities": identities, "job": self.job_id, "config": self.config}  # fmt: skip

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Job:
        identities = {int(e): i for e, i in attrs.get("identities", {}).items()}
        return cls(attrs["point"], attrs["record"], identities, attrs.get("config", {}))


def plan_jobs(spec: StudySpec) -> list[Job]:
    """Group grid points differing only in epochs into one job when the schedule allows it."""
    families: dict[str, list[dict]] = {}
    jobs: list[Job] = []
    for point in spec.points():
        config = spec.config_for(point)
        if "epochs" in spec.grid and config.epochs_independent_schedule:
            rest = {k: v for k, v in point.items() if k != "epochs"}
            families.setdefault(point_key(rest), []).append(point)
        else:
            jobs.append(Job(point, [config.epochs]))
    for points in families.values():
        epochs = sorted({spec.config_for(p).epochs for p in points})
        longest = next(p for p in points if spec.config_for(p).epochs == epochs[-1])
        jobs.append(Job(longest, epochs))
    return jobs


def job_config(spec: StudySpec, job: Job) -> RunConfig:
    return RunConfig.from_dict({"record_epochs": job.record[:-1]}, base=spec.config_for(job.point))


# ------------------------------------------------------------------------------ storage
def study_directory(spec: StudySpec, study_dir: str | Path | None) -> Path:
    return Path(study_dir) if study_dir else Path("studies-out") / spec.name


def open_study(spec: StudySpec, url: str, lock: Path) -> optuna.Study:
    """Create or load the study; `lock` serialises processes creating a new SQLite file's tables at once."""
    # ERROR: a failed trial's exception reaches the CLI, which says it in one line; optuna would add a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are documented
    heartbeat = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": grace_seconds()}
    direction = "maximize" if higher_is_better(spec.metric) else "minimize"
    creating = url.startswith("sqlite") and lock.parent.is_dir()
    with exclusive(lock) if creating else contextlib.nullcontext():
        storage = open_storage(url, **heartbeat, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
        with storage_errors(url):
            return optuna.create_study(study_name=spec.name, storage=storage, direction=direction, load_if_exists=True)


def complete_identities(study: optuna.Study) -> dict[str, int]:
    """identity -> number of a complete trial of it."""
    return {
        t.user_attrs.get("identity"): t.number
        for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
        if t.user_attrs.get("kind") in RUN_KINDS
    }


def enqueue_missing(study: optuna.Study, jobs: list[Job], lock: Path) -> int:
    """Queue each job with a grid point not complete and no trial waiting or running (failed ones are queued again).
    Under `lock`: two `study run` at once would both read, then both queue."""
    with exclusive(lock):
        done = complete_identities(study)
        pending = {
            t.user_attrs.get("job")
            for t in study.get_trials(deepcopy=False, states=(WAITING, RUNNING))
            if t.user_attrs.get("kind") == "run"
        }
        added = 0
        for job in jobs:
            if job.job_id in pending or all(i in done for i in job.identities.values()):
                continue
            study.enqueue_trial(params={}, user_attrs={"kind": "run", **job.attrs()}, skip_if_exists=False)
            added += 1
    return added


# ------------------------------------------------------------------------------ running trials
def data_identity(config: RunConfig) -> list:
    """The settings that make two trials' configs read the same decoded images (given one storage size)."""
    return [config.data, config.data_dir, config.skip_bad_images, config.resize_policy, config.labels,
            config.labels_path_column, config.labels_label_column, config.labels_split_column]  # fmt: skip


def study_storage_size(spec: StudySpec, config: RunConfig) -> int:
    """The largest storage size among the spec's configs reading the same data as `config`: trials at 64 and 128 px
    share one decode (at 128), and the test evaluation reads the same arrays. A search counts at the values of its
    space that set the size."""
    points = spec.points()
    if spec.search is not None:
        sizing = [k for k in ("resolution", "crop_fraction", "storage_size") if k in spec.search.space]
        corners = itertools.product(*(spec.search.candidates(k) for k in sizing))
        points = [{**p, **dict(zip(sizing, corner))} for corner in corners for p in points]
    configs = [spec.config_for(p, lr_unused=True) for p in points]
    same = [c for c in configs if data_identity(c) == data_identity(config)]
    return max(storage_size_for(c) for c in [config, *same])


class Worker:
    """Takes waiting trials one at a time until none is left. Data and feature caches persist across trials."""

    def __init__(self, spec: StudySpec, directory: Path, study: optuna.Study):
        self.spec, self.directory, self.study = spec, directory, study
        self._images: dict[str, ImageSet] = {}
        self.feature_cache: FeatureCache | None = None
        self._claimed: tuple[int, Path] | None = None  # the trial this worker trained last, and its run directory
        self.searches: list | None = None  # the spec's searches, once planned
        self.load_seconds = 0.0  # decoding/loading the data, once per data source

    def images_for(self, config: RunConfig) -> ImageSet:
        """The data a trial trains on: decoded once per worker at the study's largest storage size for it."""
        key = json.dumps(data_identity(config))
        if key not in self._images:
            started = time.time()
            self._images[key] = load_images(config, study_storage_size(self.spec, config))
            self.load_seconds += time.time() - started
        return self._images[key]

    def identify(self, job: Job) -> Job:
        from .models import check_resolution

        for epochs in job.record:
            point = job.recorded_point(epochs)
            config = self.spec.config_for(point)
            check_resolution(config.arch, config.resolution)  # before any trial is queued or trained
            job.identities[epochs] = trial_identity(point, config, self.images_for(config).key)
        job.config = job_config(self.spec, job).to_dict()
        return job

    def plan(self) -> list[Job]:
        """The spec's jobs with the identity of each grid point (loads the data the spec names); none when the spec
        searches (its grid points are where searches start, not trials)."""
        if self.spec.search is not None:
            return []
        return [self.identify(job) for job in plan_jobs(self.spec)]

    def find_learning_rates(self, lock: Path) -> list[dict]:
        """lr = "find": the range test (lr_find.py) once per distinct configuration needing it, stored in the study
        under its `finding_key` (a rerun reads it), its suggestion set for each such grid point (spec.found_lr), so
        it is in their configs and identities. -> [{label, key, lr}] for the report. Under `lock`: two `study run`
        at once test once."""
        from .lr_find import NOT_READ, finding_key, lr_find
        from .models import check_resolution

        groups: dict[str, list[dict]] = {}
        configs: dict[str, RunConfig] = {}
        needing = [p for p in self.spec.points() if self.spec.finds_lr(p)]
        for point in self.spec.points() if needing else []:  # what identify checks, before any test takes time
            config = self.spec.config_for(point, lr_unused=True)
            check_resolution(config.arch, config.resolution)
        for point in needing:
            config = self.spec.config_for(point, lr_unused=True)
            key = finding_key(config, self.images_for(config).key)
            groups.setdefault(key, []).append(point)
            configs[key] = config
        found = []
        for key, points in groups.items():
            shared = {k: v for k, v in points[0].items() if k not in NOT_READ and all(p.get(k) == v for p in points)}
            label = point_key(shared) or "every grid point"
            with exclusive(lock):
                record = self.study.user_attrs.get(key)
                if record is None:
                    log(f'lr = "find" ({label}): learning-rate range test')
                    if self.feature_cache is None:
                        self.feature_cache = FeatureCache(configs[key].resolved_cache_dir() / "features")
                    config = configs[key]
                    result = lr_find(config, images=self.images_for(config), feature_cache=self.feature_cache, log=log)
                    if result.suggestion is None:
                        raise StudyError(f'lr = "find" ({label}): {result.summary()}; set lr to a number for it')
                    record = {**result.to_dict(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
                    self.study.set_user_attr(key, record)
                    log(f'lr = "find" ({label}): {result.summary()}')
                else:
                    log(f'lr = "find" ({label}): lr {record["suggestion"]:.3g}, found by an earlier run ({key})')
            for point in points:
                self.spec.found_lr[self.spec.point_id(point)] = record["suggestion"]
            found.append({"label": label, "key": key, "lr": record["suggestion"]})
        return found

    def _duplicate_of(self, trial: optuna.Trial, job: Job) -> int | None:
        """The trial that finished this job or claimed it first, when that is another trial (it was queued twice)."""
        done = complete_identities(self.study)
        if all(i in done for i in job.identities.values()):
            return done[job.identity]
        mine = (trial.datetime_start, trial.number)
        for t in self.study.get_trials(deepcopy=False, states=(RUNNING,)):
            if (
                t.number != trial.number
                and t.user_attrs.get("job") == job.job_id
                and (t.datetime_start, t.number) < mine
            ):
                return t.number
        return None

    def _config(self, trial: optuna.Trial, job: Job) -> RunConfig:
        """The config the job was queued with (whatever this worker's spec); this machine's data and weights must
        be those it was queued with."""
        stored = job.config or job_config(self.spec, job).to_dict()
        local = {k: getattr(self.spec.base, k) for k in ("progress", "cache_dir")}
        config = RunConfig.from_dict({**stored, **local})
        if trial_identity(job.point, config, self.images_for(config).key) != job.identity:
            raise StudyError(
                f"trial {trial.number} ({job.key}): the data or weights here differ from those it was queued with"
            )
        return config

    def objective(self, trial: optuna.Trial) -> float:
        attrs = trial.user_attrs
        if attrs.get("kind") != "run":  # the queue emptied between our look and our claim: not a grid point
            raise optuna.TrialPruned("no waiting grid point was left to claim")
        job = Job.from_attrs(attrs)
        if not job.identities:  # queued before trials had identities
            for name, value in self.identify(job).attrs().items():
                trial.set_user_attr(name, value)
        current = current_identities(self.study)  # the grid points of the spec `study run` recorded last
        if current is not None and not set(job.identities.values()) <= current:
            why = "queued by an earlier spec (the spec, data or weights changed since): not run"
            trial.set_user_attr("stale", why)
            log(f"trial {trial.number}: {job.key} was {why}")
            raise optuna.TrialPruned(why)
        duplicate = self._duplicate_of(trial, job)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate)
            log(f"trial {trial.number}: {job.key} is trial {duplicate}'s job (queued twice): not trained again")
            raise optuna.TrialPruned(f"a duplicate of trial {duplicate}")
        trial.set_user_attr("owner", {**process_identity(), "trial": trial.number})  # killed: a rerun here re-queues it
        log(f"trial {trial.number}: {job.key}" + (f" (recording epochs {job.record})" if len(job.record) > 1 else ""))
        return self.train_job(trial, job)

    def train_job(self, trial: optuna.Trial, job: Job, prune: bool = False) -> float:
        """Train a claimed trial's job in its run directory (resuming its state.pt) and record it in the trial.
        With `prune` (a search's trial) the study's pruner may stop it after an epoch: what it trained is recorded
        and the trial is pruned; a run whose loss stops being finite is pruned too (`stopped`: "diverged")."""
        from .cost import measure_cost
        from .selection import improves
        from .train import Trainer, TrainingError

        config = self._config(trial, job)
        if self.feature_cache is None:
            self.feature_cache = FeatureCache(config.resolved_cache_dir() / "features")
        run_dir = self.directory / "trials" / slug(job.key, job.job_id)
        self._claimed = (trial.number, run_dir)
        started = time.time()
        # the folder is named by the job's identity: what it holds is this job's, or a retry's to replace
        trainer = Trainer(config, run_dir, images=self.images_for(config), feature_cache=self.feature_cache, log=log,
                          overwrite=True)  # fmt: skip
        metric = self.spec.metric

        reported: dict[int, dict] = {}

        def on_epoch(row: dict) -> bool:
            trial.report(row[metric], row["epoch"])
            reported[row["epoch"]] = row
            # the last epoch is never cut: the run is complete, its result valid
            return prune and row["epoch"] < config.epochs and trial.should_prune()

        try:
            result = trainer.fit(on_epoch=on_epoch)
        except TrainingError as error:
            if not prune:
                raise
            best = None
            for row in reported.values():
                best = row if improves(row, best, metric) else best
            self._stop(trial, "diverged", str(error), list(reported.values()), best, time.time() - started, run_dir)
        # a retry resumed from state.pt: the killed attempt reported the first epochs, not this trial
        for row in result.history:
            if row["epoch"] not in reported:
                trial.report(row[metric], row["epoch"])
        elapsed = time.time() - started
        if result.stopped:
            reason = f"pruned after epoch {len(result.history)} of {config.epochs}"
            self._stop(trial, "pruned", reason, result.history, result.best, elapsed, run_dir)
        base_attrs = {
            "config": config.to_dict(),
            "n_train": len(trainer.split.train),  # what each accuracy is a proportion of: its precision, its interval
            "n_val": len(trainer.split.val),
            "input_path": result.feature_path,
            "run_dir": str(run_dir.relative_to(self.directory)),
            # parameters, FLOPs/image, training and inference throughput: measured once per run (cost.py)
            "cost": measure_cost(config, trainer.num_classes, len(trainer.split.train), result.history),
        }
        for epochs in job.record[:-1]:
            self._add_derived(trial, job, epochs, result, base_attrs)
        summary = result.at_epoch(job.record[-1])
        for name, value in {
            **base_attrs,
            "history": summary["history"],
            "best": summary["best"],
            "best_epoch": summary["best_epoch"],
            "best_epoch_tie": summary["tie"],  # the best epoch tied others on the metric (selection.epoch_tie)
            "checkpoint": str((run_dir / "best.pt").relative_to(self.directory)),
            "wall_seconds": elapsed,
            # one-off work of the run (absent when fit found it finished): not part of any epoch's seconds
            "setup_seconds": trainer.setup_seconds,
            "feature_seconds": trainer.feature_seconds if trainer.setup_seconds is not None else None,
        }.items():
            trial.set_user_attr(name, value)
        return summary["best"][metric]

    def _stop(self, trial, why: str, reason: str, history: list, best, elapsed: float, run_dir: Path) -> NoReturn:
        """Record what a search trial trained before it was stopped, then prune it (never selected)."""
        for name, value in {
            "stopped": why,
            "reason": reason,
            "stopped_at": len(history),  # epochs trained, restored ones included
            "history": history,
            "best": best,
            "run_dir": str(run_dir.relative_to(self.directory)),
            "wall_seconds": elapsed,
        }.items():
            trial.set_user_attr(name, value)
        log(f"trial {trial.number}: {reason}")
        raise optuna.TrialPruned(reason)

    def _add_derived(self, trial, job: Job, epochs: int, result, base_attrs: dict) -> None:
        point = job.recorded_point(epochs)
        identity = job.identities[epochs]
        if identity in complete_identities(self.study):
            return
        summary = result.at_epoch(epochs)
        metric = self.spec.metric
        self.study.add_trial(
            optuna.trial.create_trial(
                state=COMPLETE,
                value=summary["best"][metric],
                intermediate_values={r["epoch"]: r[metric] for r in summary["history"]},
                user_attrs={
                    **base_attrs,
                    "kind": "derived",
                    "key": point_key(point),
                    "point": point,
                    "identity": identity,
                    "source_trial": trial.number,
                    "history": summary["history"],
                    "best": summary["best"],
                    "best_epoch": summary["best_epoch"],
                    "best_epoch_tie": summary["tie"],
                    "checkpoint": str(result.checkpoints[epochs].relative_to(self.directory)),
                    "wall_seconds": sum(r["seconds"] for r in summary["history"]),
                },
            )
        )

    def drop_resume_state(self, study: optuna.Study | None = None) -> None:
        """Once its trial is recorded complete (or pruned by a search), a run needs no state.pt (fit keeps it for a
        retry until then)."""
        if self._claimed is None:
            return
        number, run_dir = self._claimed
        self._claimed = None
        finished = (study or self.study).get_trials(deepcopy=False, states=(COMPLETE, TrialState.PRUNED))
        if any(t.number == number for t in finished):
            (run_dir / "state.pt").unlink(missing_ok=True)

    def plan_searches(self) -> list:
        """The spec's searches (one per grid point), their Optuna studies opened (see search.py)."""
        from .search import plan_searches

        if self.searches is None:
            self.searches = plan_searches(self)
        return self.searches

    def run(self, wait_for_others: bool) -> None:
        while True:
            fail_orphaned_trials(self.study)  # killed on this machine: re-queued now
            fail_stale_trials(self.study)  # silent for the grace period (elsewhere, or unsure): re-queued
            waiting = self.study.get_trials(deepcopy=False, states=(WAITING,))
            if waiting:
                self.study.optimize(self.objective, n_trials=1, catch=(), gc_after_trial=False)
                self.drop_resume_state()
                continue
            running = self.study.get_trials(deepcopy=False, states=(RUNNING,))
            if not running or not wait_for_others:
                break
            time.sleep(HEARTBEAT_SECONDS)
        if self.spec.search is not None:
            from .search import run_searches, verify_searches

            verify_searches(self.study, self.plan_searches())
            run_searches(self, self.searches, wait_for_others)


def _prepare(
    spec_path, study_dir, storage, overrides, create: bool = True
) -> tuple[StudySpec, Path, str, optuna.Study]:
    """The spec, the study directory, the storage URL (password in memory only) and the study, opened before
    anything is written: a bad storage leaves no trace. Without `create` (a worker) the study must exist already."""
    from .models import resolve_device

    spec = StudySpec.load(spec_path, overrides)
    for device in {spec.config_for(point, lr_unused=True).device for point in spec.points()}:
        resolve_device(device)  # cuda where there is none: one line before anything is written, not a failed trial
    directory = study_directory(spec, study_dir)
    url = resolve_url(directory, storage, spec.storage, spec.storage_password_env)
    sys.argv[:] = [hide(arg, url) for arg in sys.argv]  # runs record their command line (metrics.json)
    if not create:
        require_existing(url)
        with storage_errors(url):
            if spec.name not in optuna.get_all_study_names(open_storage(url)):
                raise StudyError(f"no study {spec.name!r} in {redact(url)}: create it with `transferlab study run`")
    if url == default_url(directory):
        directory.mkdir(parents=True, exist_ok=True)  # where the SQLite file goes
    study = open_study(spec, url, lock_path(url, directory))
    directory.mkdir(parents=True, exist_ok=True)
    return spec, directory, url, study


@contextlib.contextmanager
def spec_advice():
    """Errors whose fix is a run option say how a study sets it (its spec, --set), not how `train` does."""
    from .models import WeightsError

    try:
        yield
    except WeightsError as error:
        raise error.for_study() from None


def run_worker(spec_path, *, study_dir=None, storage=None, overrides=(), wait_for_others: bool = False) -> None:
    """Join an existing study and work through its waiting trials."""
    with spec_advice():
        spec, directory, url, study = _prepare(spec_path, study_dir, storage, overrides, create=False)
        with storage_errors(url):
            Worker(spec, directory, study).run(wait_for_others)


def record_spec(study: optuna.Study, spec: StudySpec, spec_path, url: str, jobs: list[Job], searches=()) -> None:
    """The current spec, how it was run (no password), the identities of its grid points and its searches."""
    source = dict(spec.source)
    if "storage" in source:
        source["storage"] = redact(str(source["storage"]))
    from_cli = sys.argv and "transferlab" in sys.argv[0]
    command = shlex.join(["transferlab", *sys.argv[1:]]) if from_cli else f"run_study({str(spec_path)!r})"
    study.set_user_attr("spec", source)
    study.set_user_attr("spec_path", str(spec_path))
    study.set_user_attr("command", hide(command, url))
    study.set_user_attr("cwd", os.getcwd())  # relative paths in the spec are relative to it
    study.set_user_attr("software", build_info())
    study.set_user_attr("identities", sorted({i for job in jobs for i in job.identities.values()}))
    study.set_user_attr("searches", [s.record() for s in searches])


def start_workers(n: int, spec_path, directory: Path, url: str, overrides) -> list[subprocess.Popen]:
    """n worker processes; the storage password, if any, travels in their environment, not on their command line."""
    threads = max(1, (os.cpu_count() or 1) // (n + 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if password_of(url):
        env[PASSWORD_ENV] = password_of(url)
    cmd = [sys.executable, "-m", "transferlab.cli", "study", "worker", str(spec_path), "--dir", str(directory)]
    cmd += ["--storage", without_password(url)]
    for text in overrides:
        cmd += ["--set", hide(text, url)]  # --storage above wins over a storage= override
    import torch

    torch.set_num_threads(threads)
    return [subprocess.Popen(cmd, env=env) for _ in range(n)]


def run_study(spec_path, *, study_dir=None, storage=None, workers: int = 1, overrides=(), report: bool = True) -> Path:
    """Create or resume the study, run everything still to do, select, test once, report."""
    if workers < 1:
        raise StudyError(f"--workers {workers}: expected 1 or more worker processes")
    with spec_advice():
        return _run_study(spec_path, study_dir, storage, workers, overrides, report)


def _run_study(spec_path, study_dir, storage, workers: int, overrides, report: bool) -> Path:
    started = time.time()
    spec, directory, url, study = _prepare(spec_path, study_dir, storage, overrides)
    save_url(directory, url)
    (directory / "study.txt").write_text(spec.name)  # which study of a shared storage this directory reports
    with storage_errors(url):
        worker = Worker(spec, directory, study)
        found_lr = worker.find_learning_rates(lock_path(url, directory))  # before the plan: identities hold the rates
        jobs = worker.plan()
        searches = worker.plan_searches()
        record_spec(study, spec, spec_path, url, jobs, searches)
        study.set_user_attr("lr_found", found_lr)
        added = enqueue_missing(study, jobs, lock_path(url, directory))
        if searches:
            what = f"{len(searches)} searches, one per grid point" if len(searches) > 1 else "one search"
            log(f"study {spec.name}: {what}; storage {redact(url)}")
        else:
            log(
                f"study {spec.name}: {len(spec.points())} grid points as {len(jobs)} runs; {added} queued now; "
                f"storage {redact(url)}"
            )
        procs = start_workers(workers - 1, spec_path, directory, url, overrides) if workers > 1 else []
        try:
            worker.run(wait_for_others=True)
        finally:
            for p in procs:
                p.wait()
        for p in procs:
            if p.returncode:
                raise StudyError(f"a worker process exited with status {p.returncode}")
        if searches:
            from .search import complete_trials

            candidates = [t for search in searches for t in complete_trials(search.study)]
            select_and_test(study, spec, directory, candidates=candidates)
        else:
            select_and_test(study, spec, directory, {i for job in jobs for i in job.identities.values()})
        finished = time.time()
        study.set_user_attr(
            "last_run",
            {
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished)),
                "wall_seconds": finished - started,
                "load_seconds": worker.load_seconds,
            },
        )
        if report:
            from .report import write_report

            for path in write_report(directory, storage=url, study_name=spec.name):
                log(f"wrote {path}")
    return directory


# ---------------------------------------------------------------------- selection and the single test evaluation
def best_configuration(trials: list, spec: StudySpec) -> tuple[Any, list, Tie | None]:
    """The configuration (a grid point without its replicate axes: seed, fold) of best mean metric over its
    replicates, and of those the trial of best metric, whose checkpoint is the one tested (selection.py breaks ties:
    validation loss, then fewer epochs, then the lower trial number). Returns (that trial, the configuration's
    trials, the tie the choice of configuration broke, or None). Without replicates: the best trial, alone."""
    if not spec.replicates:  # every trial its own configuration (a search's trials share their grid point)
        best, tie = best_trial(trials, spec.metric)
        return best, [best], tie
    groups: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.number):
        groups.setdefault(point_key(configuration_of(t.user_attrs["point"], spec.replicates)), []).append(t)

    def label(group: list) -> str:
        return point_key(configuration_of(group[0].user_attrs["point"], spec.replicates))

    chosen, tie = best_group(list(groups.values()), spec.metric, label)
    return best_trial(chosen, spec.metric)[0], chosen, tie


def select_and_test(
    study: optuna.Study, spec: StudySpec, directory: Path, identities: set[str] | None = None, candidates=None
) -> dict:
    """Best of the spec's trials (`identities`, default: those recorded in the study) by the study's metric; its
    checkpoint is evaluated once on the test split. `candidates`: the complete trials to choose from instead (the
    searches' complete trials; pruned ones never). With replicate axes (seed, fold) the best configuration by its
    mean (`best_configuration`) and, of its replicates, the best trial's checkpoint."""
    import torch

    from .analysis import error_analysis
    from .data import Split, split_arrays, split_for
    from .evaluate import TEMPERATURE_RANGE, align_labels, evaluate_logits, load_checkpoint, view_probabilities
    from .models import get_backbone
    from .train import split_class_counts

    trials = grid_trials(study, identities) if candidates is None else candidates
    if candidates is None and len(trials) < len(spec.points()):
        raise StudyError(
            f"{len(spec.points()) - len(trials)} grid points are not complete; run the study again to finish them"
        )
    if not trials:
        raise StudyError("no search trial is complete (all pruned or diverged): nothing to select")
    best, replicates, tie = best_configuration(trials, spec)
    selected = study.user_attrs.get("selected")
    if selected and selected.get("identity") == best.user_attrs["identity"]:
        return selected
    previous = study.user_attrs.get("test_evaluations", [])
    config = RunConfig.from_dict(best.user_attrs["config"])
    images = load_images(config, study_storage_size(spec, config))
    split_file = directory / best.user_attrs["run_dir"] / "split.json"
    split = Split.from_dict(json.loads(split_file.read_text())) if split_file.exists() else split_for(images, config)
    record = {
        "trial": best.number,
        "key": best.user_attrs["key"],
        "identity": best.user_attrs["identity"],
        "point": best.user_attrs["point"],
        "val_accuracy": best.user_attrs["best"]["val_accuracy"],
        "val_loss": best.user_attrs["best"]["val_loss"],
        # absent from trials recorded before these metrics were
        "val_balanced_accuracy": best.user_attrs["best"].get("val_balanced_accuracy"),
        "val_macro_f1": best.user_attrs["best"].get("val_macro_f1"),
        "metric": spec.metric,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        # the choice was a tie on the metric, and what broke it (selection.py); None: the metric decided
        "tie": tie.to_dict() if tie else None,
    }
    if spec.replicates:  # the configuration chosen by its mean; `trial` is its replicate whose checkpoint is tested
        record["configuration"] = {
            "key": point_key(configuration_of(best.user_attrs["point"], spec.replicates)),
            "replicate_axes": spec.replicates,
            "trials": [t.number for t in replicates],
            "mean": statistics.fmean(t.value for t in replicates),
        }
    record["class_counts"] = split_class_counts(images, split)
    record["n_val"] = sum(record["class_counts"]["val"].values())
    if len(split.test) == 0 and not split.official_test:
        selected = {**record, "test": None}
        study.set_user_attr("selected", selected)
        log(
            f"selected trial {best.number} ({record['key']}): val accuracy "
            f"{percent(round(record['val_accuracy'] * record['n_val']), record['n_val'])}; "
            "no test split (test_fraction = 0): the selected trial was not evaluated on a test set"
        )
        return selected
    test_x, test_y = split_arrays(images, split, "test")
    started = time.time()
    loaded = load_checkpoint(directory / best.user_attrs["checkpoint"], config.device)
    test_y = torch.as_tensor(align_labels(loaded, ImageSet(test_x, test_y, images.classes, images.key)))
    logits = loaded.view_logits(test_x)
    result = evaluate_logits(loaded, logits, test_y)
    calibration = {
        "temperature": result["temperature"],
        "ece": result["ece"],
        "ece_calibrated": result["ece_calibrated"],
        "nll": result["nll"],
        "nll_calibrated": result["nll_calibrated"],
        "reliability": result["reliability"],
        "reliability_calibrated": result["reliability_calibrated"],
        "temperature_range": list(TEMPERATURE_RANGE),  # the fit's bounds: a T at one says the search stopped there
        "fit": result["calibration"],  # how T was chosen on validation: fitted, or 1 and why (None: not recorded)
    }
    errors = error_analysis(
        loaded.model, get_backbone(loaded.info["arch"]), loaded.preprocess, test_x, test_y,
        view_probabilities(logits), view_probabilities(logits, loaded.temperature),
    )  # fmt: skip
    record.update(
        test_seconds=time.time() - started,
        test_accuracy=result["accuracy"],
        test_loss=result["loss"],
        test_balanced_accuracy=result["balanced_accuracy"],
        test_macro_f1=result["macro_f1"],
        n_test=result["n"],
        per_class_accuracy=result["per_class_accuracy"],
        confusion_matrix=result["confusion_matrix"],
        classes=result["classes"],
        per_class=result["per_class"],
        calibration=calibration,
    )
    # the thumbnails and Grad-CAM maps only in `selected`: the list of evaluations keeps the figures
    study.set_user_attr("test_evaluations", previous + [record])
    study.set_user_attr("selected", {**record, "errors": errors})
    chosen = (
        f"configuration {record['configuration']['key']} (best mean {spec.metric} over {len(replicates)} "
        f"replicates), its best replicate trial {best.number} ({record['key']})"
        if spec.replicates
        else f"trial {best.number} ({record['key']})"
    )
    correct = round(record["test_accuracy"] * record["n_test"])  # the exact fraction correct (evaluate.scores)
    log(
        f"selected {chosen}: val accuracy {percent(round(record['val_accuracy'] * record['n_val']), record['n_val'])}, "
        "test accuracy "
        f"{percent_with_interval(correct, record['n_test'])} on {record['n_test']} images (test split used once)"
    )
    return {**record, "errors": errors}
