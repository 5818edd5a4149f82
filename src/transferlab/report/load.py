"""What a report shows, read from a study's storage alone: the study record, its trials and searches as typed
records (study/records.py). Nothing is created: a missing storage is an error."""

from __future__ import annotations

from pathlib import Path

import optuna

from ..config.study import StudySpec
from ..engine.rundir import RunDir
from ..errors import StudyError
from ..study.records import (
    Selection,
    StudyRecord,
    TrialRecord,
    current_identities,
    grid_trials,
    older_trials,
    trial_records,
)
from ..study.storage import open_storage, require_existing, resolve_url, saved_study_name, storage_errors
from ..urls import hide, redact
from .data import SearchData, StudyData
from .format import _natural, _value


def load_study_data(directory: str | Path, storage: str | None = None, study_name: str | None = None) -> StudyData:
    """The study a directory reports, read from its storage alone (nothing is created: a missing one is an error)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StudyError(f"no study directory {directory}")
    url = resolve_url(directory, storage)
    require_existing(url)
    with storage_errors(url):
        return _read_study(directory, url, study_name)


def _read_study(directory: Path, url: str, study_name: str | None) -> StudyData:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = optuna.get_all_study_names(open_storage(url))
    name = study_name or saved_study_name(directory)  # a storage may hold several studies
    if name is None:
        if len(names) != 1:
            raise StudyError(
                f"{redact(url)} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                f"{directory} does not say which one (no study.txt)"
            )
        name = names[0]
    elif name not in names:
        raise StudyError(f"no study {name!r} in {redact(url)}")
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    record = StudyRecord.of(study)
    spec = StudySpec.from_dict(record.spec, name=study.study_name)
    identities = current_identities(study)
    read = [_read_search(url, r) for r in record.searches] if spec.search else []
    searches = [search for search, _ in read]
    trials = sorted(grid_trials(study, identities), key=lambda t: t.number)
    trials += [t for _, complete in read for t in complete]  # the searches' complete trials, in search order
    for t in trials:  # trials recorded before n_train / n_val were: from the run's metrics.json, if it is there
        t.n_val = t.n_val if t.n_val is not None else _from_metrics(directory, t.run_dir, "n_val")
        t.n_train = t.n_train if t.n_train is not None else _from_metrics(directory, t.run_dir, "n_train")
    selected = record.selection or Selection.from_dict(record.test_evaluations[-1] if record.test_evaluations else None)
    searched = {t.identity for t in trials if t.kind == "search"}  # the current searches' complete trials
    if selected and identities is not None and selected.identity not in identities | searched:
        selected = None  # selected under an earlier spec
    env = {}
    if trials:
        env = _from_metrics(directory, trials[0].run_dir, "environment") or {}
    spec_tree = dict(record.spec)
    if "storage" in spec_tree:  # studies recorded before passwords were kept out of the storage
        spec_tree["storage"] = redact(str(spec_tree["storage"]))
    grid = dict(spec.grid)
    if spec.search is not None:  # the searched options are the axes that tell a search's trials apart
        for key in spec.search.space:
            grid[key] = sorted({_value(t, key) for t in trials}, key=_natural)
    return StudyData(
        study.study_name,
        spec_tree,
        hide(record.command, url),
        trials,
        grid,
        selected,
        len(record.test_evaluations),
        env,
        older_trials(study, identities),
        sum(t.stale is not None for t in trial_records(study)),
        directory,
        record,
        [{**f, "finding": StudyRecord.finding(study, f["key"])} for f in record.lr_found],
        searches=searches,
    )


def _from_metrics(directory: Path, run_dir: str | None, key: str):
    """A value of a run's metrics.json (None when the run folder or the key is not there)."""
    return (RunDir(directory / run_dir).metrics() or {}).get(key) if run_dir else None


def _read_search(url: str, searched: dict) -> tuple[SearchData, list[TrialRecord]]:
    """A search's trials (all states) with its importances, and its complete trials."""
    storage = open_storage(url)
    name, label, point = searched["name"], searched["key"] or "all", searched["point"]
    if name not in optuna.get_all_study_names(storage):  # recorded, never started
        return SearchData(name, label, point, [], None, "no trial yet"), []
    study = optuna.load_study(study_name=name, storage=storage)
    trials = trial_records(study)
    complete = [t for t in trials if t.state == "COMPLETE" and t.kind == "search"]
    importances, why = _importances(study, complete)
    constant = [k for k in (complete[0].params if complete else {}) if len({repr(t.params[k]) for t in complete}) == 1]
    return SearchData(name, label, point, trials, importances, why, constant if len(complete) > 1 else []), complete


def _importances(study, complete: list[TrialRecord]) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importances (fANOVA, seeded) over the options the complete trials vary, or why none."""
    if len(complete) < 2:
        return None, f"{len(complete)} complete trial{'' if len(complete) == 1 else 's'} (importances need 2 or more)"
    varied = [k for k in complete[0].params if len({repr(t.params.get(k)) for t in complete}) > 1]
    if not varied:
        return None, f"its {len(complete)} complete trials share every parameter value"
    if len({t.value for t in complete}) < 2:
        return None, f"its {len(complete)} complete trials all scored {complete[0].value:.4f}: no variance to explain"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)), ""
    except RuntimeError as error:  # fANOVA's trees found no variance (a handful of trials)
        return None, f"fANOVA could not attribute its {len(complete)} complete trials' variance ({error})"
