"""Searches: a study spec's [search] table makes each grid point the start of its own Optuna search.

Storage layout (the same storage as the study's own Optuna study, see runner.py):
  study user attr  searches: [{name, key, point}], the current spec's searches
  one Optuna study per search, named `<study>/search/<grid point>#<hash>`: the hash covers what every trial of the
                   search shares (the grid point's training settings but the searched ones, the data, the weights)
                   and the space, so a changed spec starts a new search and never continues one whose trials
                   trained something else. Each search's sampler learns from its own trials only.
  its trials       user attrs: kind="search", search (its study's name), grid_point, params (the sampled values),
                   and those of a grid trial: key, point (grid point + params), identity, job, config, history,
                   best, checkpoint, run_dir, cost, wall_seconds ...
                   pruned: stopped ("pruned": by the pruner; "diverged": its loss stopped being finite), reason,
                   stopped_at (epochs trained), history, best (of those epochs)
                   not run at all (pruned, counted nowhere): skipped (why: another worker filled the search or runs
                   the same parameters)

A search trial is its grid point's config plus the sampled values; its run directory is named by its identity like a
grid trial's. A search ends when n_trials of its trials have finished (complete or pruned) or its trials have spent
`timeout` seconds; `study run` again continues it, and never redoes a finished trial. A trial whose worker died
(kill -9) fails by heartbeat and Optuna's retry queues it again with the same parameters: the same identity, the
same run directory, resumed from its state.pt.

Sampling: TPE and random draw trial number k of a search with the seed `seed + k`: the same spec proposes the same
trials, a continued search new ones rather than its first ones again (a sampler made afresh with one seed would repeat
them), and parallel workers different ones. QMC and grid keep the seed: their position comes from the trials in the
storage. Two workers that still pick the same parameters at once do not share a run directory: the second finds the
first's lock on it (errors.RunBusyError, from engine/rundir) and skips the trial.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from ..config.metrics import higher_is_better
from ..config.search import SearchRange, SearchSpec
from ..config.study import StudySpec, point_key
from ..errors import RunBusyError, StudyError
from ..models.registry import check_resolution
from ..progress import log
from . import liveness
from .identity import training_fingerprint
from .plan import Job, config_for
from .records import StudyRecord, TrialRecord, trial_records, write
from .worker import Worker

WAITING, RUNNING, COMPLETE, PRUNED = TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED


# ------------------------------------------------------------------------------ samplers and pruners
def make_sampler(settings: SearchSpec, n: int) -> optuna.samplers.BaseSampler:
    """The search's sampler for its next trial; `n`: the trials it holds already."""
    seed = (settings.seed + n) % 2**32
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # constant liar: parallel workers
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "qmc":  # the scrambling seed stays; listed values are drawn at random, per trial
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # documented since Optuna 3
            return optuna.samplers.QMCSampler(
                scramble=True, seed=settings.seed, independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                warn_independent_sampling=False, warn_asynchronous_seeding=False,
            )  # fmt: skip
    return optuna.samplers.GridSampler(settings.grid_values(), seed=settings.seed)


class WarmedUp(optuna.pruners.BasePruner):
    """`pruner`, asked only once `startup_trials` trials of the search have completed, and never about a trial's
    first `warmup_epochs` epochs: the first trials are never pruned, a trial's first epochs never judged."""

    def __init__(self, pruner: optuna.pruners.BasePruner, startup_trials: int, warmup_epochs: int):
        self.pruner, self.startup_trials, self.warmup_epochs = pruner, startup_trials, warmup_epochs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step <= self.warmup_epochs:
            return False
        if len(study.get_trials(deepcopy=False, states=(COMPLETE,))) < self.startup_trials:
            return False
        return self.pruner.prune(study, trial)


def make_pruner(settings: SearchSpec, epochs: int) -> optuna.pruners.BasePruner:
    """The search's pruner; `epochs`: its grid point's (hyperband's largest resource, unless epochs is searched)."""
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "median":
        inner = optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0)
    else:
        longest = epochs if "epochs" not in settings.space and epochs > 1 else "auto"
        inner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=longest)
    return WarmedUp(inner, settings.startup_trials, settings.warmup_epochs)


def suggest(trial: optuna.Trial, space: dict[str, SearchRange | list]) -> dict[str, Any]:
    """The trial's values of the searched options (a retried trial gets its original's)."""
    params = {}
    for key, dimension in space.items():
        if isinstance(dimension, list):
            params[key] = trial.suggest_categorical(key, dimension)
        elif dimension.integer:
            params[key] = trial.suggest_int(key, dimension.low, dimension.high, step=dimension.step or 1,
                                            log=dimension.log)  # fmt: skip
        else:
            params[key] = trial.suggest_float(key, dimension.low, dimension.high, step=dimension.step,
                                              log=dimension.log)  # fmt: skip
    return params


# ------------------------------------------------------------------------------ the searches of a spec
@dataclass
class Search:
    name: str  # its Optuna study's
    point: dict[str, Any]  # the grid point it starts from
    settings: SearchSpec
    epochs: int  # the grid point's
    storage: Any = field(repr=False)
    direction: str = "maximize"
    _study: optuna.Study | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return point_key(self.point) or "all"

    def record(self) -> dict:
        return {"name": self.name, "key": point_key(self.point), "point": self.point}

    @property
    def study(self) -> optuna.Study:
        """Its Optuna study, created on first use."""
        if self._study is None:
            self._study = optuna.create_study(
                study_name=self.name, storage=self.storage, direction=self.direction, load_if_exists=True,
                pruner=make_pruner(self.settings, self.epochs),
            )  # fmt: skip
        return self._study

    def wants_another(self, trials: list[TrialRecord]) -> bool:
        """Whether a new trial may start, given the search's `trials`: fewer than n_trials finished or running,
        less than `timeout` seconds spent."""
        target = self.settings.target()
        if target is not None and len(counted(trials)) + sum(t.state == "RUNNING" for t in trials) >= target:
            return False
        return self.settings.timeout is None or spent_seconds(trials) < self.settings.timeout


def counted(trials: list[TrialRecord]) -> list[TrialRecord]:
    """The finished trials that count towards n_trials: complete or pruned, not skipped."""
    return [t for t in trials if t.state in ("COMPLETE", "PRUNED") and t.skipped is None]


def spent_seconds(trials: list[TrialRecord]) -> float:
    """Seconds the search's trials have taken (running ones so far): what `timeout` limits."""
    now = datetime.now()  # Optuna records local, naive times
    return sum(
        ((t.datetime_complete or now) - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_start is not None and t.skipped is None
    )


def complete_trials(study: optuna.Study) -> list[TrialRecord]:
    """A search's complete trials: the candidates for selection (pruned ones never are)."""
    return [t for t in trial_records(study, (COMPLETE,)) if t.kind == "search"]


def space_record(settings: SearchSpec) -> dict:
    return {k: v if isinstance(v, list) else dataclasses.asdict(v) for k, v in settings.space.items()}


def search_name(spec: StudySpec, point: dict, data_key: str) -> str:
    """`<study>/search/<grid point>#<hash of what its trials share and of the space>`."""
    config = config_for(spec, point)
    shared = training_fingerprint(config, data_key, leave_out=spec.search.space, space=space_record(spec.search))
    key = point_key(point)
    return f"{spec.name}/search/{key}#{shared[:12]}" if key else f"{spec.name}/search#{shared[:12]}"


def plan_searches(worker: Worker) -> list[Search]:
    """One search per grid point (loads the data the spec names); every resolution the space reaches is checked
    against the backbone before any trial starts."""
    spec = worker.spec
    if spec.search is None:
        return []
    searches = []
    for point in spec.points():
        config = config_for(spec, point)
        values = spec.search.candidates("resolution") if "resolution" in spec.search.space else [None]
        for value in values:
            at = config_for(spec, {**point, "resolution": value}) if value is not None else config
            check_resolution(at.arch, at.resolution)
        name = search_name(spec, point, worker.images_for(config).key)
        direction = "maximize" if higher_is_better(spec.metric) else "minimize"
        # the storage the study was opened with: its heartbeats and retry callback serve the searches too
        searches.append(Search(name, point, spec.search, config.epochs, worker.study._storage, direction))
    return searches


def verify_searches(study: optuna.Study, searches: list[Search]) -> None:
    """A worker's searches must be those `study run` recorded: the same spec, data and weights."""
    recorded = {r["name"] for r in StudyRecord.of(study).searches}
    for search in searches:
        if search.name not in recorded:
            raise StudyError(
                f"search {search.label}: the spec, data or weights here differ from those `study run` recorded "
                f"(no search {search.name!r} in the study)"
            )


# ------------------------------------------------------------------------------ running a search
def run_searches(worker: Worker, searches: list[Search], wait_for_others: bool) -> None:
    """Every trial the searches still want, search after search; then, with `wait_for_others`, wait for other
    workers' trials (one of which may die and come back to be retried)."""
    while True:
        running = [search for search in searches if run_search(worker, search)]
        if not (running and wait_for_others):
            break
        time.sleep(liveness.HEARTBEAT_SECONDS)
    for search in searches:
        finished = counted(trial_records(search.study))
        pruned = sum(t.state == "PRUNED" for t in finished)
        log(f"search {search.label}: {len(finished)} trials finished ({pruned} pruned)")


def run_search(worker: Worker, search: Search) -> bool:
    """Trials of `search` until it wants no more (retried trials first); whether other workers still run some."""
    study = search.study
    while True:
        fail_stale_trials(study)  # a dead worker's trial is queued again, with its parameters
        trials = trial_records(study)
        if not (any(t.state == "WAITING" for t in trials) or search.wants_another(trials)):
            return any(t.state == "RUNNING" for t in trials)
        study.sampler = make_sampler(search.settings, len(trials))  # objective() reseeds it by trial number
        study.optimize(lambda trial: objective(worker, search, trial), n_trials=1, catch=(), gc_after_trial=False)
        worker.drop_resume_state(study)


def _skip(trial: optuna.Trial, why: str) -> None:
    write(trial, skipped=why)
    log(f"trial {trial.number}: not run: {why}")
    raise optuna.TrialPruned(why)


def objective(worker: Worker, search: Search, trial: optuna.Trial) -> float:
    retry = TrialRecord.of(trial).identity is not None  # Optuna's retry of a dead worker's trial carries its record
    mine = (trial.datetime_start, trial.number)
    others = [t for t in trial_records(search.study) if t.number != trial.number]
    before = [t for t in others if t.state != "RUNNING" or (t.datetime_start, t.number) < mine]
    if not retry and not search.wants_another(before):  # another worker took the search's last trial first
        _skip(trial, "the search had all its trials when this one started")
    # seeded by the trial's number, unique across workers: two workers never draw from one seed
    search.study.sampler = make_sampler(search.settings, trial.number)
    params = suggest(trial, search.settings.space)
    point = {**search.point, **params}
    job = worker.identify(Job(point, [config_for(worker.spec, point).epochs]))
    for t in others:
        if t.state == "RUNNING" and t.identity == job.identity and (t.datetime_start, t.number) < mine:
            _skip(trial, f"trial {t.number} is training the same parameters")
    queued = job.trial_record(kind="search")
    queued.search, queued.grid_point, queued.params = search.name, search.point, params
    write(trial, **queued.attrs("kind", "search", "grid_point", "params", "key", "point", "record", "identity",
                                "identities", "job", "config"))  # fmt: skip
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    log(f"search {search.label}: trial {trial.number}{' (retried)' if retry else ''}: {shown}")
    # the check above misses a trial that started at the same moment: its run directory's lock says it
    try:
        return worker.train_job(trial, job, prune=True)
    except RunBusyError:
        _skip(trial, "another worker is training the same parameters")
