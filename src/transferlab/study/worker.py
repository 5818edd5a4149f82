"""A study worker: takes waiting trials one at a time, trains each job in its run folder and records it.

Workers claim waiting trials through Optuna's queue, which pops them atomically; a heartbeat marks the trials of a
dead worker failed and re-queues them; their run folder's state.pt lets the retry continue from the last finished
epoch. A claimed trial whose job another trial has finished, or a lower-numbered copy of which is still waiting or
running (two `study run` queued it twice), is pruned as a duplicate, and one queued by an earlier spec as stale:
neither is trained.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NoReturn

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from ..config.identity import fields_of, fingerprint
from ..config.run import RunConfig
from ..config.study import StudySpec, point_key
from ..data.imageset import ImageSet
from ..data.sources import load_images
from ..engine.features import FeatureCache
from ..engine.lr_find import NOT_READ, finding_key, lr_find
from ..engine.rundir import RunDir
from ..engine.train import run_training
from ..errors import StudyError, TrainingError
from ..fsutil import exclusive
from ..inference.cost import measure_cost
from ..models.registry import check_resolution
from ..progress import log
from ..scoring.selection import best_row
from . import liveness
from .identity import data_identity, slug, trial_identity
from .liveness import fail_orphaned_trials, process_identity
from .plan import Job, config_for, job_config, plan_jobs, study_storage_size
from .records import StudyRecord, TrialRecord, complete_identities, current_identities, trial_records, write

COMPLETE, RUNNING, WAITING = TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING


class Worker:
    """Takes waiting trials one at a time until none is left. Data and feature caches persist across trials."""

    def __init__(self, spec: StudySpec, directory: Path, study: optuna.Study):
        self.spec, self.directory, self.study = spec, directory, study
        self._images: dict[str, ImageSet] = {}
        self.feature_cache: FeatureCache | None = None
        self._claimed: tuple[int, Path] | None = None  # the trial this worker trained last, and its run directory
        self.load_seconds = 0.0  # decoding/loading the data, once per data source

    def images_for(self, config: RunConfig) -> ImageSet:
        """The data a trial trains on: decoded once per worker at the study's largest storage size for it."""
        key = fingerprint(data_identity(config))
        if key not in self._images:
            started = time.time()
            self._images[key] = load_images(config, study_storage_size(self.spec, config))
            self.load_seconds += time.time() - started
        return self._images[key]

    def identify(self, job: Job) -> Job:
        for epochs in job.record:
            point = job.recorded_point(epochs)
            config = config_for(self.spec, point)
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
        """lr = "find": the range test (engine/lr_find.py) once per distinct configuration needing it, stored in the
        study under its `finding_key` (a rerun reads it), its suggestion set for each such grid point
        (spec.found_lr), so it is in their configs and identities. -> [{label, key, lr}] for the report. Under
        `lock`: two `study run` at once test once."""
        groups: dict[str, list[dict]] = {}
        configs: dict[str, RunConfig] = {}
        needing = [p for p in self.spec.points() if self.spec.finds_lr(p)]
        for point in self.spec.points() if needing else []:  # what identify checks, before any test takes time
            config = config_for(self.spec, point, lr_unused=True)
            check_resolution(config.arch, config.resolution)
        for point in needing:
            config = config_for(self.spec, point, lr_unused=True)
            key = finding_key(config, self.images_for(config).key)
            groups.setdefault(key, []).append(point)
            configs[key] = config
        schedule = {f.name for f in RunConfig.__dataclass_fields__.values() if f.metadata.get("section") == NOT_READ}
        found = []
        for key, points in groups.items():
            shared = {k: v for k, v in points[0].items() if k not in schedule and all(p.get(k) == v for p in points)}
            label = point_key(shared) or "every grid point"
            with exclusive(lock):
                finding = StudyRecord.finding(self.study, key)
                if finding is None:
                    log(f'lr = "find" ({label}): learning-rate range test')
                    config = configs[key]
                    if self.feature_cache is None:
                        self.feature_cache = FeatureCache(config.resolved_cache_dir() / "features")
                    result = lr_find(config, images=self.images_for(config), feature_cache=self.feature_cache, log=log)
                    if result.suggestion is None:
                        raise StudyError(f'lr = "find" ({label}): {result.summary()}; set lr to a number for it')
                    finding = {**result.to_dict(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
                    StudyRecord.write_finding(self.study, key, finding)
                    log(f'lr = "find" ({label}): {result.summary()}')
                else:
                    log(f'lr = "find" ({label}): lr {finding["suggestion"]:.3g}, found by an earlier run ({key})')
            for point in points:
                self.spec.found_lr[self.spec.point_id(point)] = finding["suggestion"]
            found.append({"label": label, "key": key, "lr": finding["suggestion"]})
        return found

    def _duplicate_of(self, trial: optuna.Trial, job: Job) -> int | None:
        """The trial that finished this job, or a lower-numbered copy of it still waiting or running (it was queued
        twice): the lowest-numbered live copy is the one that trains. Numbers, not claim times, decide: two workers
        claiming both copies at once may each commit its claim before seeing the other's, yet agree on the order."""
        done = complete_identities(self.study)
        if all(i in done for i in job.identities.values()):
            return done[job.identity]
        for t in trial_records(self.study, (WAITING, RUNNING)):
            if t.number < trial.number and t.job == job.job_id:
                return t.number
        return None

    def _config(self, trial: optuna.Trial, job: Job) -> RunConfig:
        """The config the job was queued with (whatever this worker's spec); this machine's data and weights must
        be those it was queued with."""
        stored = job.config or job_config(self.spec, job).to_dict()
        local = {f.name: getattr(self.spec.base, f.name) for f in fields_of(self.spec.base, roles=("runtime",))}
        config = RunConfig.from_dict({**stored, **local})
        if trial_identity(job.point, config, self.images_for(config).key) != job.identity:
            raise StudyError(
                f"trial {trial.number} ({job.key}): the data or weights here differ from those it was queued with"
            )
        return config

    def objective(self, trial: optuna.Trial) -> float:
        record = TrialRecord.of(trial)
        if record.kind != "run":  # the queue emptied between our look and our claim: not a grid point
            raise optuna.TrialPruned("no waiting grid point was left to claim")
        job = Job.of(record)
        if not job.identities:  # queued before trials had identities
            queued = self.identify(job).trial_record()
            write(trial, **queued.attrs("identity", "identities", "job", "config"))
        current = current_identities(self.study)  # the grid points of the spec `study run` recorded last
        if current is not None and not set(job.identities.values()) <= current:
            why = "queued by an earlier spec (the spec, data or weights changed since): not run"
            write(trial, stale=why)
            log(f"trial {trial.number}: {job.key} was {why}")
            raise optuna.TrialPruned(why)
        duplicate = self._duplicate_of(trial, job)
        if duplicate is not None:
            write(trial, duplicate_of=duplicate)
            log(f"trial {trial.number}: {job.key} is trial {duplicate}'s job (queued twice): not trained again")
            raise optuna.TrialPruned(f"a duplicate of trial {duplicate}")
        write(trial, owner={**process_identity(), "trial": trial.number})  # killed: a rerun here re-queues it
        log(f"trial {trial.number}: {job.key}" + (f" (recording epochs {job.record})" if len(job.record) > 1 else ""))
        return self.train_job(trial, job)

    def train_job(self, trial: optuna.Trial, job: Job, prune: bool = False) -> float:
        """Train a claimed trial's job in its run directory (resuming its state.pt) and record it in the trial.
        With `prune` (a search's trial) the study's pruner may stop it after an epoch: what it trained is recorded
        and the trial is pruned; a run whose loss stops being finite is pruned too (`stopped`: "diverged")."""
        config = self._config(trial, job)
        if self.feature_cache is None:
            self.feature_cache = FeatureCache(config.resolved_cache_dir() / "features")
        run_dir = self.directory / "trials" / slug(job.key, job.job_id)
        self._claimed = (trial.number, run_dir)
        started = time.time()
        metric = self.spec.metric
        reported: dict[int, dict] = {}

        def on_epoch(row: dict) -> bool:
            trial.report(row[metric], row["epoch"])
            reported[row["epoch"]] = row
            # the last epoch is never cut: the run is complete, its result valid
            return prune and row["epoch"] < config.epochs and trial.should_prune()

        try:  # the folder is named by the job's identity: what it holds is this job's, or a retry's to replace
            result = run_training(config, run_dir, images=self.images_for(config), feature_cache=self.feature_cache,
                                  log=log, overwrite=True, on_epoch=on_epoch)  # fmt: skip
        except TrainingError as error:
            if not prune:
                raise
            rows = list(reported.values())
            self._stop(trial, "diverged", str(error), rows, best_row(rows, metric) if rows else None,
                       time.time() - started, run_dir)  # fmt: skip
        # a retry resumed from state.pt: the killed attempt reported the first epochs, not this trial
        for row in result.history:
            if row["epoch"] not in reported:
                trial.report(row[metric], row["epoch"])
        elapsed = time.time() - started
        if result.stopped:
            reason = f"pruned after epoch {len(result.history)} of {config.epochs}"
            self._stop(trial, "pruned", reason, result.history, result.best, elapsed, run_dir)
        trained = TrialRecord(
            config=config.to_dict(),
            n_train=result.n_train,  # what each accuracy is a proportion of: its precision, its interval
            n_val=result.n_val,
            input_path=result.feature_path,
            run_dir=str(run_dir.relative_to(self.directory)),
            # parameters, FLOPs/image, training and inference throughput: measured once per run (inference/cost.py)
            cost=measure_cost(config, result.num_classes, result.n_train, result.history),
        )
        shared = ("config", "n_train", "n_val", "input_path", "run_dir", "cost")
        for epochs in job.record[:-1]:
            self._add_derived(trial, job, epochs, result, trained, shared)
        summary = result.at_epoch(job.record[-1])
        trained.history, trained.best, trained.best_epoch = summary["history"], summary["best"], summary["best_epoch"]
        trained.best_epoch_tie = summary["tie"]  # the best epoch tied others on the metric (selection.epoch_tie)
        trained.checkpoint = str(RunDir(run_dir).best.relative_to(self.directory))
        trained.wall_seconds = elapsed
        # one-off work of the run (absent when fit found it finished): not part of any epoch's seconds
        trained.setup_seconds, trained.feature_seconds = result.setup_seconds, result.feature_seconds
        write(trial, **trained.attrs(*shared, "history", "best", "best_epoch", "best_epoch_tie", "checkpoint",
                                     "wall_seconds", "setup_seconds", "feature_seconds"))  # fmt: skip
        return summary["best"][metric]

    def _stop(self, trial, why: str, reason: str, history: list, best, elapsed: float, run_dir: Path) -> NoReturn:
        """Record what a search trial trained before it was stopped, then prune it (never selected)."""
        write(trial, stopped=why, reason=reason, stopped_at=len(history), history=history, best=best,
              run_dir=str(run_dir.relative_to(self.directory)), wall_seconds=elapsed)  # fmt: skip
        log(f"trial {trial.number}: {reason}")
        raise optuna.TrialPruned(reason)

    def _add_derived(self, trial, job: Job, epochs: int, result, trained: TrialRecord, shared: tuple) -> None:
        point = job.recorded_point(epochs)
        identity = job.identities[epochs]
        if identity in complete_identities(self.study):
            return
        summary = result.at_epoch(epochs)
        metric = self.spec.metric
        derived = TrialRecord(**trained.attrs(*shared), kind="derived", key=point_key(point), point=point,
                              identity=identity, source_trial=trial.number, history=summary["history"],
                              best=summary["best"], best_epoch=summary["best_epoch"], best_epoch_tie=summary["tie"],
                              checkpoint=str(result.checkpoints[epochs].relative_to(self.directory)),
                              wall_seconds=sum(r["seconds"] for r in summary["history"]))  # fmt: skip
        self.study.add_trial(
            optuna.trial.create_trial(
                state=COMPLETE,
                value=summary["best"][metric],
                intermediate_values={r["epoch"]: r[metric] for r in summary["history"]},
                user_attrs=derived.attrs(
                    *shared,
                    "kind",
                    "key",
                    "point",
                    "identity",
                    "source_trial",
                    "history",
                    "best",
                    "best_epoch",
                    "best_epoch_tie",
                    "checkpoint",
                    "wall_seconds",
                ),
            )  # fmt: skip
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
            RunDir(run_dir).drop_state()

    def run(self, wait_for_others: bool) -> None:
        """The grid's waiting trials until none is left (and, with `wait_for_others`, until no other worker runs one:
        a dead worker's trial may come back to be retried)."""
        while True:
            fail_orphaned_trials(self.study)  # killed on this machine: re-queued now
            fail_stale_trials(self.study)  # silent for the grace period (elsewhere, or unsure): re-queued
            if self.study.get_trials(deepcopy=False, states=(WAITING,)):
                self.study.optimize(self.objective, n_trials=1, catch=(), gc_after_trial=False)
                self.drop_resume_state()
                continue
            running = self.study.get_trials(deepcopy=False, states=(RUNNING,))
            if not running or not wait_for_others:
                break
            time.sleep(liveness.HEARTBEAT_SECONDS)
