"""A study: every grid point a trial in an Optuna storage; workers; resume; selection; one test evaluation.

Storage layout (Optuna, SQLite in the study directory by default, any RDB URL to share):
  study user attrs   spec (the resolved TOML tree), spec_path, command, selection and test results
  one trial per job  user attrs: kind="run", key, point, record (epochs recorded), history, best, checkpoint
  derived trials     kind="derived": a grid point whose epochs are a prefix of a longer job's run

Jobs: grid points that differ only in `epochs`, under a schedule that ignores the total epoch count,
are one run recorded at each requested epoch (the study's 50/150/300 become one 300-epoch run).
Workers claim waiting trials through Optuna's queue, which pops them atomically; a heartbeat marks
the trials of a dead worker failed and re-queues them; their run directory's state.pt lets the
retry continue from the last finished epoch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from .config import RunConfig, StudySpec
from .data import ImageSet, load_images
from .features import FeatureCache
from .progress import console

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
WAITING, RUNNING, COMPLETE = TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE


def log(text: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)


# ------------------------------------------------------------------------------ jobs
def point_key(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={point[k]}" for k in sorted(point))


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", key).replace(",", "__")[:180]


@dataclass
class Job:
    point: dict[str, Any]  # the grid point actually trained (the longest epochs of its family)
    record: list[int]  # epochs at which a grid point is recorded

    @property
    def key(self) -> str:
        return point_key(self.point)


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


# ------------------------------------------------------------------------------ storage
def study_directory(spec: StudySpec, study_dir: str | Path | None) -> Path:
    return Path(study_dir) if study_dir else Path("studies-out") / spec.name


def open_storage(url: str) -> RDBStorage:
    warnings.filterwarnings(
        "ignore", category=optuna.exceptions.ExperimentalWarning
    )  # heartbeats are the documented way
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
    )


def storage_url(directory: Path, storage: str | None, spec: StudySpec | None = None) -> str:
    if storage:
        return storage
    if spec is not None and spec.storage:
        return spec.storage
    saved = directory / "storage.txt"
    if saved.exists():
        return saved.read_text().strip()
    return f"sqlite:///{directory.resolve() / 'study.db'}"


def open_study(spec: StudySpec, directory: Path, url: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = "maximize" if spec.metric == "val_accuracy" else "minimize"
    return optuna.create_study(
        study_name=spec.name, storage=open_storage(url), direction=direction, load_if_exists=True
    )


def enqueue_missing(study: optuna.Study, spec: StudySpec, jobs: list[Job]) -> int:
    """Queue each job that has no trial waiting, running or complete (failed ones are queued again)."""
    present = {
        t.user_attrs.get("key")
        for t in study.get_trials(deepcopy=False, states=(WAITING, RUNNING, COMPLETE))
        if t.user_attrs.get("kind") == "run"
    }
    added = 0
    for job in jobs:
        if job.key not in present:
            study.enqueue_trial(
                params={},
                user_attrs={"kind": "run", "key": job.key, "point": job.point, "record": job.record},
                skip_if_exists=False,
            )
            added += 1
    return added


# ------------------------------------------------------------------------------ running trials
class Worker:
    """Takes waiting trials one at a time until none is left. Data and feature caches persist across trials."""

    def __init__(self, spec: StudySpec, directory: Path, study: optuna.Study):
        self.spec, self.directory, self.study = spec, directory, study
        self._images: dict[str, ImageSet] = {}
        self.feature_cache: FeatureCache | None = None

    def images_for(self, config: RunConfig) -> ImageSet:
        key = json.dumps([config.data, config.data_dir, config.skip_bad_images])
        if key not in self._images:
            self._images[key] = load_images(config)
        return self._images[key]

    def objective(self, trial: optuna.Trial) -> float:
        from .train import Trainer

        attrs = trial.user_attrs
        if attrs.get("kind") != "run":  # the queue emptied between our look and our claim: not a grid point
            raise optuna.TrialPruned("no waiting grid point was left to claim")
        job = Job(attrs["point"], attrs["record"])
        config = RunConfig.from_dict({"record_epochs": job.record[:-1]}, base=self.spec.config_for(job.point))
        if self.feature_cache is None:
            self.feature_cache = FeatureCache(config.resolved_cache_dir() / "features")
        run_dir = self.directory / "trials" / slug(job.key)
        log(f"trial {trial.number}: {job.key}" + (f" (recording epochs {job.record})" if len(job.record) > 1 else ""))
        started = time.time()
        trainer = Trainer(config, run_dir, images=self.images_for(config), feature_cache=self.feature_cache, log=log)
        metric = self.spec.metric

        reported: set[int] = set()

        def on_epoch(row: dict) -> None:
            trial.report(row[metric], row["epoch"])
            reported.add(row["epoch"])

        result = trainer.fit(on_epoch=on_epoch)
        for row in (
            result.history
        ):  # a retry resumed from state.pt: the killed attempt reported the first epochs, not this trial
            if row["epoch"] not in reported:
                trial.report(row[metric], row["epoch"])
        elapsed = time.time() - started
        base_attrs = {
            "config": config.to_dict(),
            "input_path": result.feature_path,
            "run_dir": str(run_dir.relative_to(self.directory)),
        }
        for epochs in job.record[:-1]:
            self._add_derived(trial, job, epochs, result, base_attrs)
        summary = result.at_epoch(job.record[-1])
        for name, value in {
            **base_attrs,
            "history": summary["history"],
            "best": summary["best"],
            "best_epoch": summary["best_epoch"],
            "checkpoint": str((run_dir / "best.pt").relative_to(self.directory)),
            "wall_seconds": elapsed,
        }.items():
            trial.set_user_attr(name, value)
        return summary["best"][metric]

    def _add_derived(self, trial, job: Job, epochs: int, result, base_attrs: dict) -> None:
        point = {**job.point, "epochs": epochs}
        key = point_key(point)
        done = {t.user_attrs.get("key") for t in self.study.get_trials(deepcopy=False, states=(COMPLETE,))}
        if key in done:
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
                    "key": key,
                    "point": point,
                    "source_trial": trial.number,
                    "history": summary["history"],
                    "best": summary["best"],
                    "best_epoch": summary["best_epoch"],
                    "checkpoint": str(result.checkpoints[epochs].relative_to(self.directory)),
                    "wall_seconds": sum(r["seconds"] for r in summary["history"]),
                },
            )
        )

    def run(self, wait_for_others: bool) -> None:
        while True:
            fail_stale_trials(self.study)  # re-queues the trials of dead workers
            waiting = self.study.get_trials(deepcopy=False, states=(WAITING,))
            if waiting:
                self.study.optimize(self.objective, n_trials=1, catch=(), gc_after_trial=False)
                continue
            running = self.study.get_trials(deepcopy=False, states=(RUNNING,))
            if not running or not wait_for_others:
                return
            time.sleep(HEARTBEAT_SECONDS)


def _prepare(spec_path, study_dir, storage, overrides) -> tuple[StudySpec, Path, str]:
    spec = StudySpec.load(spec_path, overrides)
    directory = study_directory(spec, study_dir)
    directory.mkdir(parents=True, exist_ok=True)
    url = storage_url(directory, storage, spec)
    return spec, directory, url


def run_worker(spec_path, *, study_dir=None, storage=None, overrides=(), wait_for_others: bool = False) -> None:
    """Join an existing study and work through its waiting trials."""
    spec, directory, url = _prepare(spec_path, study_dir, storage, overrides)
    study = open_study(spec, directory, url)
    Worker(spec, directory, study).run(wait_for_others)


def run_study(spec_path, *, study_dir=None, storage=None, workers: int = 1, overrides=(), report: bool = True) -> Path:
    """Create or resume the study, run everything still to do, select, test once, report."""
    spec, directory, url = _prepare(spec_path, study_dir, storage, overrides)
    (directory / "storage.txt").write_text(url)
    (directory / "study.txt").write_text(spec.name)  # which study of a shared storage this directory reports
    study = open_study(spec, directory, url)
    if "spec" not in study.user_attrs or study.user_attrs["spec"] != spec.source:
        study.set_user_attr("spec", spec.source)
        study.set_user_attr("spec_path", str(spec_path))
    study.set_user_attr(
        "command",
        shlex.join(["transferlab", *sys.argv[1:]])
        if sys.argv and "transferlab" in sys.argv[0]
        else f"run_study({spec_path!r})",
    )
    jobs = plan_jobs(spec)
    added = enqueue_missing(study, spec, jobs)
    n_points = len(spec.points())
    log(f"study {spec.name}: {n_points} grid points as {len(jobs)} runs; {added} queued now; storage {url}")
    procs = []
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [
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
        ]
        for text in overrides:
            cmd += ["--set", text]
        procs = [subprocess.Popen(cmd, env=env) for _ in range(workers - 1)]
        import torch

        torch.set_num_threads(threads)
    try:
        Worker(spec, directory, study).run(wait_for_others=True)
    finally:
        for p in procs:
            p.wait()
    for p in procs:
        if p.returncode:
            raise RuntimeError(f"a worker process exited with status {p.returncode}")
    select_and_test(study, spec, directory)
    if report:
        from .report import write_report

        for path in write_report(directory, storage=url, study_name=spec.name):
            log(f"wrote {path}")
    return directory


# ---------------------------------------------------------------------- selection and the single test evaluation
def grid_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """One complete trial per grid point (the newest, should a point have been completed twice)."""
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(COMPLETE,)):
        if t.user_attrs.get("kind") in ("run", "derived"):
            latest[t.user_attrs["key"]] = t
    return list(latest.values())


def select_and_test(study: optuna.Study, spec: StudySpec, directory: Path) -> dict:
    """Best trial by the study's metric; its checkpoint is evaluated once on the test split."""
    from .data import Split, make_split
    from .evaluate import align_labels, evaluate_arrays, load_checkpoint

    trials = grid_trials(study)
    if len(trials) < len(spec.points()):
        raise RuntimeError(
            f"{len(spec.points()) - len(trials)} grid points are not complete; run the study again to finish them"
        )
    sign = 1 if spec.metric == "val_accuracy" else -1
    best = max(trials, key=lambda t: (sign * t.value, -t.number))
    previous = study.user_attrs.get("test_evaluations", [])
    if previous and previous[-1]["key"] == best.user_attrs["key"]:
        return previous[-1]
    config = RunConfig.from_dict(best.user_attrs["config"])
    images = load_images(config)
    split_file = directory / best.user_attrs["run_dir"] / "split.json"
    split = (
        Split.from_dict(json.loads(split_file.read_text()))
        if split_file.exists()
        else make_split(
            images.labels,
            test_fraction=config.test_fraction,
            val_fraction=config.val_fraction,
            seed=config.split_seed,
            limit=config.limit,
            official_test=config.official_test,
        )
    )
    loaded = load_checkpoint(directory / best.user_attrs["checkpoint"], config.device)
    if split.official_test:
        test_x, test_y = images.test_images, images.test_labels
    else:
        test_x, test_y = images.images[split.test], images.labels[split.test]
    result = evaluate_arrays(loaded, test_x, align_labels(loaded, ImageSet(test_x, test_y, images.classes, images.key)))
    record = {
        "trial": best.number,
        "key": best.user_attrs["key"],
        "point": best.user_attrs["point"],
        "val_accuracy": best.user_attrs["best"]["val_accuracy"],
        "val_loss": best.user_attrs["best"]["val_loss"],
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "n_test": result["n"],
        "per_class_accuracy": result["per_class_accuracy"],
        "confusion_matrix": result["confusion_matrix"],
        "classes": result["classes"],
        "metric": spec.metric,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    study.set_user_attr("test_evaluations", previous + [record])
    log(
        f"selected trial {best.number} ({record['key']}): val accuracy {record['val_accuracy']:.4f}, "
        f"test accuracy {record['test_accuracy']:.4f} on {record['n_test']} images (test split used once)"
    )
    return record
