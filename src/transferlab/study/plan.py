"""What a study trains: its grid points as jobs, each with the config it trains and the identity of each recorded
grid point, queued once in the storage.

Jobs: grid points that differ only in `epochs`, under a schedule that ignores the total epoch count, are one run
recorded at each requested epoch (the study's 50/150/300 become one 300-epoch run).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..config.run import RunConfig
from ..config.study import StudySpec, point_key
from ..data.sources import STORAGE_SIZE_INPUTS, storage_size_for
from ..fsutil import exclusive
from ..models.registry import resolve
from .identity import data_identity
from .records import TrialRecord, complete_identities, trial_records


def config_for(spec: StudySpec, point: dict[str, Any], *, lr_unused: bool = False) -> RunConfig:
    """The grid point's run config (StudySpec.config_for) with its backbone's defaults filled in."""
    return resolve(spec.config_for(point, lr_unused=lr_unused))


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

    def trial_record(self, kind: str = "run") -> TrialRecord:
        """The job as a queued trial's record."""
        identities = {str(e): i for e, i in self.identities.items()}
        return TrialRecord(kind=kind, key=self.key, point=self.point, record=self.record, identity=self.identity,
                           identities=identities, job=self.job_id, config=self.config)  # fmt: skip

    @classmethod
    def of(cls, record: TrialRecord) -> Job:
        identities = {int(e): i for e, i in record.identities.items()}
        return cls(record.point, record.record, identities, record.config)


QUEUED = ("kind", "key", "point", "record", "identity", "identities", "job", "config")  # a job's record fields


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
    return RunConfig.from_dict({"record_epochs": job.record[:-1]}, base=config_for(spec, job.point))


def study_storage_size(spec: StudySpec, config: RunConfig) -> int:
    """The largest storage size among the spec's configs reading the same data as `config`: trials at 64 and 128 px
    share one decode (at 128), and the test evaluation reads the same arrays. A search counts at the values of its
    space that set the size."""
    points = spec.points()
    if spec.search is not None:
        sizing = [k for k in STORAGE_SIZE_INPUTS if k in spec.search.space]
        corners = itertools.product(*(spec.search.candidates(k) for k in sizing))
        points = [{**p, **dict(zip(sizing, corner))} for corner in corners for p in points]
    configs = [config_for(spec, p, lr_unused=True) for p in points]
    same = [c for c in configs if data_identity(c) == data_identity(config)]
    return max(storage_size_for(c) for c in [config, *same])


def enqueue_missing(study: optuna.Study, jobs: list[Job], lock: Path) -> int:
    """Queue each job with a grid point not complete and no trial waiting or running (failed ones are queued again).
    Under `lock`: two `study run` at once would both read, then both queue."""
    with exclusive(lock):
        done = complete_identities(study)
        pending = {t.job for t in trial_records(study, (TrialState.WAITING, TrialState.RUNNING)) if t.kind == "run"}
        added = 0
        for job in jobs:
            if job.job_id in pending or all(i in done for i in job.identities.values()):
                continue
            study.enqueue_trial(params={}, user_attrs=job.trial_record().attrs(*QUEUED), skip_if_exists=False)
            added += 1
    return added
