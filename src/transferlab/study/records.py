"""The one schema of what a study stores: typed records, read from and written to Optuna's user attributes here only.

Storage layout (Optuna; SQLite in the study directory by default, any RDB URL to share):
  the study         `StudyRecord`: the spec (the resolved TOML tree), how it was run (spec path, command, working
                    directory, software), the identities of the current spec's grid points, its searches, the
                    selection and every test evaluation (`Selection`), lr findings and the last run's times
  one trial per job `TrialRecord`: kind "run" (a queued job: grid point, epochs recorded, identities, config), then
                    what training recorded (history, best epoch, checkpoint, run folder, cost, times)
  derived trials    kind "derived": a grid point whose epochs are a prefix of a longer job's run
  search trials     kind "search", in an Optuna study of their own per search (search.py): the sampled `params`,
                    and when stopped early `stopped` ("pruned" or "diverged"), `reason`, `stopped_at`

Nothing else in transferlab reads or writes a user attribute by name: a field renamed here is renamed everywhere,
and a record written before a field existed reads as the field's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

RUN_KINDS = ("run", "derived")  # the kinds a grid's trials have (a search's are "search")


@dataclass
class TrialRecord:
    """One trial of a study, as stored: what was queued, who ran it, what it recorded."""

    # what the trial is
    kind: str = ""  # "run" (a queued job), "derived" (an epoch prefix of a run) or "search"
    key: str = ""  # its grid point as text (point_key)
    point: dict = field(default_factory=dict)  # its grid point (a search's: with the sampled values)
    identity: str | None = None  # grid point + fingerprint of everything that trains it
    # a queued job: the epochs recorded, each recorded grid point's identity, the job's id and the config it trains
    record: list[int] = field(default_factory=list)
    identities: dict[str, str] = field(default_factory=dict)  # epochs (as text) -> identity
    job: str = ""
    config: dict = field(default_factory=dict)
    # a search's trial
    search: str | None = None  # its search's Optuna study name
    grid_point: dict | None = None
    params: dict = field(default_factory=dict)
    # who ran it, and what became of it
    owner: dict | None = None  # the process that claimed it (liveness.process_identity + the trial number)
    duplicate_of: int | None = None  # pruned: another trial ran the same job
    stale: str | None = None  # pruned: queued by an earlier spec, not run
    skipped: str | None = None  # pruned: a search trial that was not run, and why
    stopped: str | None = None  # a search trial stopped early: "pruned" or "diverged"
    reason: str = ""
    stopped_at: int | None = None  # epochs it trained
    # what training recorded
    history: list[dict] = field(default_factory=list)  # a row per epoch (metrics.json's)
    best: dict = field(default_factory=dict)  # the best epoch's row by the selection metric
    best_epoch: int | None = None
    best_epoch_tie: dict | None = None  # scoring.selection.Tie.to_dict()
    checkpoint: str = ""  # best.pt, relative to the study directory
    run_dir: str = ""  # relative to the study directory
    input_path: str = ""  # "cached" or "images"
    n_train: int | None = None  # what its accuracies are proportions of
    n_val: int | None = None
    source_trial: int | None = None  # a derived trial's run
    wall_seconds: float = 0.0
    setup_seconds: float | None = None  # one-off work (model, feature pass), not part of any epoch
    feature_seconds: float | None = None
    cost: dict | None = None  # inference/cost.py
    # Optuna's own (never stored as user attributes)
    number: int = -1
    state: str = ""
    value: float | None = None
    datetime_start: Any = None
    datetime_complete: Any = None

    @classmethod
    def of(cls, trial) -> TrialRecord:
        """The record of an Optuna trial (FrozenTrial or Trial)."""
        record = cls(**{k: v for k, v in trial.user_attrs.items() if k in ATTRIBUTES})
        record.number = trial.number
        record.state = getattr(getattr(trial, "state", None), "name", "RUNNING")
        record.value = getattr(trial, "value", None) if record.state == "COMPLETE" else None
        record.datetime_start = getattr(trial, "datetime_start", None)
        record.datetime_complete = getattr(trial, "datetime_complete", None)
        return record

    def attrs(self, *names: str) -> dict[str, Any]:
        """The named fields (all stored ones by default) as user attributes."""
        return {name: getattr(self, name) for name in (names or ATTRIBUTES)}

    @property
    def seconds(self) -> float | None:
        """The trial's wall time as Optuna recorded it (None while it runs)."""
        if self.datetime_complete is None or self.datetime_start is None:
            return None
        return (self.datetime_complete - self.datetime_start).total_seconds()


# the fields stored as user attributes (Optuna keeps number, state, value and times itself)
ATTRIBUTES = tuple(f.name for f in fields(TrialRecord) if f.name not in
                   ("number", "state", "value", "datetime_start", "datetime_complete"))  # fmt: skip


def write(trial, **values: Any) -> None:
    """Store these fields of a trial's record (an Optuna Trial); a name that is no field is a programming error."""
    for name, value in values.items():
        if name not in ATTRIBUTES:
            raise KeyError(f"{name!r} is not a field of a trial record")
        trial.set_user_attr(name, value)


@dataclass
class Selection:
    """The selected trial and its single test evaluation (or why there is none), as the study stores it."""

    trial: int
    key: str
    identity: str | None
    point: dict
    metric: str
    val_accuracy: float
    val_loss: float
    val_balanced_accuracy: float | None = None
    val_macro_f1: float | None = None
    n_val: int | None = None
    time: str = ""
    tie: dict | None = None  # the choice was a tie on the metric, and what broke it
    configuration: dict | None = None  # with replicates: {key, replicate_axes, trials, mean}
    class_counts: dict | None = None  # images per class in each split
    test: Any = "evaluated"  # None: no test split
    test_seconds: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    test_balanced_accuracy: float | None = None
    test_macro_f1: float | None = None
    n_test: int | None = None
    per_class_accuracy: dict | None = None
    confusion_matrix: list | None = None
    classes: list | None = None
    per_class: dict | None = None
    calibration: dict | None = None
    errors: dict | None = None  # the mistakes gallery and Grad-CAM maps (in `selected` only)

    def to_dict(self, errors: bool = True) -> dict:
        out = dataclasses.asdict(self)
        if not errors:
            out.pop("errors")
        return out

    @classmethod
    def from_dict(cls, values: dict | None) -> Selection | None:
        if not values:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class StudyRecord:
    """What a study stores about itself (Optuna study user attributes)."""

    spec: dict = field(default_factory=dict)  # the resolved spec tree (storage password removed)
    spec_path: str = ""
    command: str = ""  # passwords hidden
    cwd: str = ""  # relative paths in the spec are relative to it
    software: dict = field(default_factory=dict)  # version.build_info()
    identities: list[str] | None = None  # the current spec's grid points (None: recorded before identities)
    searches: list[dict] = field(default_factory=list)  # [{name, key, point}]
    selected: dict | None = None  # Selection.to_dict()
    test_evaluations: list[dict] = field(default_factory=list)  # every Selection evaluated, without its images
    lr_found: list[dict] = field(default_factory=list)  # lr = "find": [{label, key, lr}]
    last_run: dict | None = None  # {started, finished, wall_seconds, load_seconds}

    @classmethod
    def of(cls, study) -> StudyRecord:
        attrs = study.user_attrs
        return cls(**{f.name: attrs[f.name] for f in fields(cls) if f.name in attrs})

    @property
    def selection(self) -> Selection | None:
        return Selection.from_dict(self.selected)

    @staticmethod
    def write(study, **values: Any) -> None:
        known = {f.name for f in fields(StudyRecord)}
        for name, value in values.items():
            if name not in known:
                raise KeyError(f"{name!r} is not a field of a study record")
            study.set_user_attr(name, value)

    @staticmethod
    def finding(study, key: str) -> dict | None:
        """A stored lr range test finding (its key: engine.lr_find.finding_key)."""
        return study.user_attrs.get(key)

    @staticmethod
    def write_finding(study, key: str, finding: dict) -> None:
        if not key.startswith("lr_find:"):
            raise KeyError(f"{key!r} is not an lr finding's key")
        study.set_user_attr(key, finding)


# ------------------------------------------------------------------------------ the trials a study holds
def trial_records(study, states=None) -> list[TrialRecord]:
    """Every trial of an Optuna study (of these states) as a record, by number."""
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states)]


def _complete(study) -> list[TrialRecord]:
    from optuna.trial import TrialState  # records stay free of optuna's import until a study is read

    return [t for t in trial_records(study, (TrialState.COMPLETE,)) if t.kind in RUN_KINDS]


def current_identities(study) -> set[str] | None:
    """The identities of the current spec's grid points (None: a study recorded before identities existed)."""
    identities = StudyRecord.of(study).identities
    return set(identities) if identities is not None else None


def complete_identities(study) -> dict[str, int]:
    """identity -> number of a complete grid trial of it."""
    return {t.identity: t.number for t in _complete(study)}


def grid_trials(study, identities: set[str] | None = None) -> list[TrialRecord]:
    """One complete trial per grid point of the current spec (the newest, should a point have been completed twice)."""
    identities = identities if identities is not None else current_identities(study)
    latest = {}
    for t in _complete(study):
        if identities is None or t.identity in identities:
            latest[t.key] = t
    return list(latest.values())


def older_trials(study, identities: set[str] | None = None) -> int:
    """How many complete trials belong to earlier specs (kept in the storage, not selected, not reported)."""
    identities = identities if identities is not None else current_identities(study)
    if identities is None:
        return 0
    return sum(t.identity not in identities for t in _complete(study))
