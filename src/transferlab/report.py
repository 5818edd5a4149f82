"""Study storage -> the paper's tables and plots -> report.md and a self-contained report.html.

Every number comes from the Optuna storage (trial user attributes written by the workers).
The report is a list of blocks (heading, text, table, figure) rendered twice, as Markdown and HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shlex
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from .config import REPLICATE_AXES, configuration_of, higher_is_better, replicate_axes  # noqa: E402
from .errors import OutputError  # noqa: E402
from .fsutil import atomic_write_bytes, atomic_write_text  # noqa: E402
from .stats import (  # noqa: E402
    MIN_REPLICATES,
    decimals_for,
    difference_verdict,
    format_difference,
    interval_decimals,
    paired_difference,
    percent,
    percent_with_interval,
    wilson_interval,
)
from .storage import (  # noqa: E402
    StudyError,
    current_identities,
    grid_trials,
    hide,
    older_trials,
    open_storage,
    redact,
    require_existing,
    resolve_url,
    storage_errors,
    without_password,
)

PAPER_AXES = ("strategy", "batch_size", "epochs")


@dataclass
class Block:
    kind: str  # "h2", "h3", "p", "table", "figure", "code"
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)  # tables: first row is the header
    png: bytes = b""


# ------------------------------------------------------------------------------ reading the storage
@dataclass
class StudyData:
    name: str
    spec: dict
    command: str
    trials: list[dict]  # {number, kind, key, point, history, best, wall_seconds, config, input_path}
    grid: dict[str, list]
    test: dict | None  # the selected trial; its test figures unless there was no test split
    n_test_evaluations: int
    environment: dict
    n_older: int = 0  # complete trials of earlier specs in the storage (not shown)
    n_stale: int = 0  # trials queued by an earlier spec that a worker found waiting and did not run
    directory: Path | None = None
    attrs: dict = field(default_factory=dict)  # other study user attrs: cwd, software, last_run, spec_path
    lr_found: list[dict] = field(default_factory=list)  # lr = "find": {label, key, lr, finding (the range test)}
    searches: list[SearchData] = field(default_factory=list)  # a spec with [search]: one per grid point


@dataclass
class SearchData:
    """One search of the study as its Optuna study holds it (search.py)."""

    name: str
    label: str  # its grid point's key, or "all"
    point: dict
    trials: list[dict]  # every trial: number, state, value, params, seconds, completed, stopped, stopped_at, ...
    importances: dict[str, float] | None  # Optuna's parameter importances, or None with `no_importances` saying why
    no_importances: str = ""
    constant: list[str] = field(default_factory=list)  # searched options all its complete trials share a value of


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
    import optuna

    from .config import StudySpec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = optuna.get_all_study_names(open_storage(url))
    saved = directory / "study.txt"  # written by run_study: a storage may hold several studies
    name = study_name or (saved.read_text().strip() if saved.is_file() else None)
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
    spec = StudySpec.from_dict(study.user_attrs.get("spec", {}), name=study.study_name)
    identities = current_identities(study)
    searches = [_read_search(url, r) for r in study.user_attrs.get("searches", [])] if spec.search else []
    found = sorted(grid_trials(study, identities), key=lambda t: t.number)
    found += [t for s in searches for t in s.pop("complete")]  # the searches' complete trials, in search order
    searches = [SearchData(**s) for s in searches]
    trials = []
    for t in found:
        a = t.user_attrs
        trials.append(
            {
                "number": t.number,
                "identity": a.get("identity"),
                "search": a.get("search"),
                "kind": a["kind"],
                "key": a["key"],
                "point": a["point"],
                "history": a["history"],
                "best": a["best"],
                "wall_seconds": a.get("wall_seconds", 0.0),
                "config": a["config"],
                "input_path": a.get("input_path", ""),
                "run_dir": a.get("run_dir", ""),
                "checkpoint": a.get("checkpoint", ""),
                "source_trial": a.get("source_trial"),
                "setup_seconds": a.get("setup_seconds"),
                "feature_seconds": a.get("feature_seconds"),
                "cost": a.get("cost"),  # absent from trials recorded before costs were (cost.py)
                # what its accuracies are proportions of (older trials: from the run's metrics.json, if it is there)
                "n_val": a.get("n_val", _from_metrics(directory, a.get("run_dir"), "n_val")),
                "n_train": a.get("n_train", _from_metrics(directory, a.get("run_dir"), "n_train")),
                "tie": a.get("best_epoch_tie"),
            }
        )
    evaluations = study.user_attrs.get("test_evaluations", [])
    selected = study.user_attrs.get("selected", evaluations[-1] if evaluations else None)
    searched = {t["identity"] for t in trials if t["kind"] == "search"}  # the current searches' complete trials
    if selected and identities is not None and selected.get("identity") not in identities | searched:
        selected = None  # selected under an earlier spec
    env = {}
    if trials:
        metrics = directory / trials[0]["run_dir"] / "metrics.json"
        if metrics.is_file():
            env = json.loads(metrics.read_text()).get("environment", {})
    spec_tree = dict(study.user_attrs.get("spec", {}))
    if "storage" in spec_tree:  # studies recorded before passwords were kept out of the storage
        spec_tree["storage"] = redact(str(spec_tree["storage"]))
    grid = dict(spec.grid)
    if spec.search is not None:  # the searched options are the axes that tell a search's trials apart
        for key in spec.search.space:
            grid[key] = sorted({_value(t, key) for t in trials}, key=_natural)
    return StudyData(
        study.study_name,
        spec_tree,
        hide(study.user_attrs.get("command", ""), url),
        trials,
        grid,
        selected,
        len(evaluations),
        env,
        older_trials(study, identities),
        sum("stale" in t.user_attrs for t in study.get_trials(deepcopy=False)),
        directory,
        {k: study.user_attrs[k] for k in ("cwd", "software", "last_run", "spec_path") if k in study.user_attrs},
        [{**f, "finding": study.user_attrs.get(f["key"])} for f in study.user_attrs.get("lr_found", [])],
        searches=searches,
    )


def _from_metrics(directory: Path, run_dir: str | None, key: str):
    """A value of a run's metrics.json (None when the run folder or the key is not there)."""
    path = directory / run_dir / "metrics.json" if run_dir else None
    try:
        return json.loads(path.read_text()).get(key) if path is not None else None
    except (OSError, ValueError):
        return None


def _read_search(url: str, record: dict) -> dict:
    """A search's trials (all states), its complete trials (FrozenTrials, under "complete") and the importances."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(url)
    fields = {"name": record["name"], "label": record["key"] or "all", "point": record["point"]}
    if record["name"] not in optuna.get_all_study_names(storage):  # recorded, never started
        return {**fields, "trials": [], "complete": [], "importances": None, "no_importances": "no trial yet"}
    study = optuna.load_study(study_name=record["name"], storage=storage)
    frozen = study.get_trials(deepcopy=False)
    trials = []
    for t in frozen:
        a = t.user_attrs
        ended = t.datetime_complete
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": a.get("params", t.params),
                "seconds": (ended - t.datetime_start).total_seconds() if ended and t.datetime_start else None,
                "completed": ended,
                "stopped": a.get("stopped"),
                "stopped_at": a.get("stopped_at"),
                "reason": a.get("reason", ""),
                "skipped": a.get("skipped"),
                "history": a.get("history", []),
            }
        )
    complete = [t for t in frozen if t.state == TrialState.COMPLETE and t.user_attrs.get("kind") == "search"]
    importances, why = _importances(study, complete)
    constant = [k for k in (complete[0].params if complete else {}) if len({repr(t.params[k]) for t in complete}) == 1]
    return {**fields, "trials": trials, "complete": complete, "importances": importances, "no_importances": why,
            "constant": constant if len(complete) > 1 else []}  # fmt: skip


def _importances(study, complete: list) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importances (fANOVA, seeded) over the options the complete trials vary, or why none."""
    import optuna

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


# ------------------------------------------------------------------------------ formatting
# The precision rule (stats.decimals_for): a percentage shows no digit finer than its 95% interval. A proportion of n
# images gets its Wilson interval's precision; a mean over replicates the coarser of that and the replicates' spread.
def _share(value: float | None, n: int | None, missing: str = "") -> str:
    """A proportion measured on n images, as a percentage at its interval's precision (one decimal where n is not
    recorded, in trials written before it was)."""
    if value is None:
        return missing
    if not n:
        return f"{100 * value:.1f}%"
    return percent(round(value * n), n)


def _decimals(values: list[float], n: int | None, reference: list[float] | None = None) -> int:
    """Decimals for the mean of replicate proportions of n images each (or of differences between such proportions,
    `reference` then being the proportions): no finer than the Wilson interval, nor than the replicates' spread."""
    mean = statistics.fmean(reference or values)
    wilson = interval_decimals(round(mean * n), n) if n else 1
    return min(wilson, decimals_for(100 * statistics.stdev(values))) if len(values) > 1 else wilson


def _shares(values: list[float], n: int | None) -> str:
    """Proportions of n images each: one as _share, replicates as mean ± sample std."""
    if not values:
        return ""
    if len(values) == 1:
        return _share(values[0], n)
    d = _decimals(values, n)
    return f"{100 * statistics.fmean(values):.{d}f} ± {100 * statistics.stdev(values):.{d}f}%"


def _points(values: list[float], n: int | None, reference: list[float]) -> str:
    """Differences of proportions of n images each (`reference`: the proportions), in percentage points, at the
    proportions' precision."""
    if not values:
        return ""
    d = _decimals(values, n, reference)
    if len(values) == 1:
        return f"{100 * values[0]:+.{d}f} pp"
    return f"{100 * statistics.fmean(values):+.{d}f} ± {100 * statistics.stdev(values):.{d}f} pp"


def _n_val(trials: list[dict]) -> int | None:
    """The validation images the trials' accuracies were measured on (the fewest, should they differ)."""
    found = [t["n_val"] for t in trials if t.get("n_val")]
    return min(found) if found else None


def _n_train(trials: list[dict]) -> int | None:
    found = [t["n_train"] for t in trials if t.get("n_train")]
    return min(found) if found else None


def _test_accuracy(t: dict) -> str:
    """The selected trial's test accuracy with its Wilson 95% interval, at the precision the interval justifies
    ("67.4% (95% CI 65.3-69.4)"): accuracy is k correct of n_test images."""
    n = t["n_test"]
    return percent_with_interval(round(t["test_accuracy"] * n), n)


WILSON_NOTE = (
    "The 95% CI of a test accuracy is the Wilson score interval of a proportion measured on that many images: how "
    "far the figure could move on another test set of the same size, so digits finer than it are not printed."
)


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


# ------------------------------------------------------------------------------ grouping
REGIME_ORDER = ("frozen", "partial", "full")
REGIME_COLOURS = {"frozen": "#1f77b4", "partial": "#ff7f0e", "full": "#2ca02c"}
OTHER_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _final_row(trial: dict) -> dict:
    """The figures a run of this many epochs reports: those of its last epoch (the paper's convention)."""
    return trial["history"][-1]


def _other_axes(data: StudyData) -> list[str]:
    return [a for a in data.grid if a not in PAPER_AXES and a not in REPLICATE_AXES]


def _value(trial: dict, axis: str):
    return trial["point"].get(axis, trial["config"].get(axis))


def _natural(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _regimes(data: StudyData) -> list[str]:
    """One order in every table and figure: frozen, partial, full, then any others by name."""
    found = {_value(t, "strategy") for t in data.trials}
    return [r for r in REGIME_ORDER if r in found] + sorted(str(r) for r in found if r not in REGIME_ORDER)


def _colour(regime: str) -> str:
    """A regime's colour, the same in every figure of every report."""
    if regime in REGIME_COLOURS:
        return REGIME_COLOURS[regime]
    return OTHER_COLOURS[sum(map(ord, str(regime))) % len(OTHER_COLOURS)]


def _epochs_of(data: StudyData) -> list[int]:
    return sorted({_value(t, "epochs") for t in data.trials})


def _runs(data: StudyData) -> list[dict]:
    """The trainings that actually happened: derived trials are epoch prefixes of one of these (a search's pruned
    trials trained too, and are not among the trials)."""
    return [t for t in data.trials if t["kind"] in ("run", "search")]


def _setting(t: dict, data: StudyData, skip=("strategy", "epochs", *REPLICATE_AXES)) -> str:
    """What distinguishes trials of one regime and epoch count: batch size and any other axis."""
    return ", ".join(
        f"batch size {_value(t, a)}" if a == "batch_size" else f"{a} = {_value_text(_value(t, a))}"
        for a in data.grid
        if a not in skip
    )


# ------------------------------------------------------------------------------ tables
def summary_table(data: StudyData) -> tuple[Block, dict]:
    """Regime x epochs: the best setting's validation accuracy (at its best epoch, seeds averaged), in percent.

    Returns the block and {(regime, epochs): (mean, setting, its values)} so that prose quotes the same numbers.
    With replicates (seeds, folds) a cell is their mean ± sample std and n."""
    epochs = _epochs_of(data)
    cells: dict[tuple, tuple[float, str]] = {}
    n_val = _n_val(data.trials)
    for regime in _regimes(data):
        for e in epochs:
            by_setting: dict[str, list[float]] = defaultdict(list)
            for t in data.trials:
                if _value(t, "strategy") == regime and _value(t, "epochs") == e:
                    by_setting[_setting(t, data)].append(t["best"]["val_accuracy"])
            if by_setting:
                setting = max(sorted(by_setting), key=lambda k: statistics.mean(by_setting[k]))
                cells[(regime, e)] = (statistics.mean(by_setting[setting]), setting, by_setting[setting])
    several = len({_setting(t, data) for t in data.trials}) > 1  # a setting to name
    rows = [["regime", *(f"{e} epochs" for e in epochs)]]
    for regime in _regimes(data):
        row = [regime]
        for e in epochs:
            if (regime, e) not in cells:
                row.append("")
                continue
            value, setting, values = cells[(regime, e)]
            shown = _shares(values, n_val) + (f", n = {len(values)}" if len(values) > 1 else "")
            row.append(shown + (f" ({setting})" if several and setting else ""))
        rows.append(row)
    return Block("table", rows=rows), cells


def paper_tables(data: StudyData) -> list[Block]:
    """Per regime, per batch size (and per value of any other axis): columns = epochs, rows = metrics.

    Accuracies in percent, losses as computed, the gap in percentage points. Seeds of one grid point are
    aggregated as mean ± std. Time is in the Time section, each trained epoch counted once.
    """
    blocks: list[Block] = []
    others = _other_axes(data)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for t in data.trials:
        groups[(_value(t, "strategy"), *(_value(t, a) for a in others), _value(t, "batch_size"))].append(t)
    for strategy in _regimes(data):
        blocks.append(Block("h3", f"Regime: {strategy}"))
        for key in sorted((k for k in groups if k[0] == strategy), key=lambda k: tuple(map(_natural, k))):
            trials = groups[key]
            epochs = sorted({_value(t, "epochs") for t in trials})
            extra = ", ".join(f"{a} = {_value_text(v)}" for a, v in zip(others, key[1:-1]))
            caption = f"batch size {key[-1]}" + (f", {extra}" if extra else "")
            rows = [[caption] + [f"{e} epochs" for e in epochs]]
            for label, metric in (
                ("val loss", "val_loss"),
                ("val accuracy", "val_accuracy"),
                ("train loss", "train_loss"),
                ("train accuracy", "train_accuracy"),
                ("gap (train - val accuracy)", None),
            ):
                row = [label]
                for e in epochs:
                    at = [t for t in trials if _value(t, "epochs") == e]
                    n = _n_val(at) if metric is None or metric.startswith("val") else _n_train(at)
                    if metric is None:
                        row.append(
                            _points(
                                [_final_row(t)["train_accuracy"] - _final_row(t)["val_accuracy"] for t in at],
                                n,
                                [_final_row(t)["val_accuracy"] for t in at],
                            )
                        )
                    elif metric.endswith("accuracy"):
                        row.append(_shares([_final_row(t)[metric] for t in at], n))
                    else:
                        row.append(_fmt([_final_row(t)[metric] for t in at]))
                rows.append(row)
            blocks.append(Block("table", rows=rows))
    return blocks


def _baseline(variants: list) -> str:
    return "baseline" if "baseline" in variants else variants[0]


def _variant_means(data: StudyData) -> dict[tuple, float]:
    """(variant, regime) -> mean best validation accuracy over its trials."""
    found: dict[tuple, list[float]] = defaultdict(list)
    for t in data.trials:
        found[(_value(t, "variant"), _value(t, "strategy"))].append(t["best"]["val_accuracy"])
    return {k: statistics.mean(v) for k, v in found.items()}


def variant_table(data: StudyData) -> Block:
    """Ablations: rows = variants (one change each), columns = regimes, cells = best validation accuracy (%)."""
    strategies = _regimes(data)
    rows = [["variant", *strategies]]
    for variant in data.grid["variant"]:
        row = [str(variant)]
        for strategy in strategies:
            vals = [
                t["best"]["val_accuracy"]
                for t in data.trials
                if _value(t, "variant") == variant and _value(t, "strategy") == strategy
            ]
            several = replicate_axes(data.grid) and len(vals) > 1
            row.append(_shares(vals, _n_val(data.trials)) + (f", n = {len(vals)}" if several else ""))
        rows.append(row)
    return Block("table", rows=rows)


def _like(value: float | None, reference: float, n: int | None) -> str:
    """A rate that is no simple proportion (balanced accuracy, macro-F1) at the precision of an accuracy measured on
    the same n images."""
    if value is None:
        return ""
    d = interval_decimals(round(reference * n), n) if n else 1
    return f"{100 * value:.{d}f}%"


def _best_epoch(t: dict) -> str:
    """The best epoch, and the tie it broke when others scored the same (selection.epoch_tie)."""
    tie = t.get("tie")
    if not tie:
        return str(t["best"]["epoch"])
    return f"{t['best']['epoch']} (a tie with {', '.join(map(str, tie['tied']))}, broken by {tie['broken_by']})"


def trials_table(data: StudyData) -> Block:
    """Every grid point, each accuracy at the precision its validation (training) images allow. A derived trial's
    time is its run's (not counted again)."""
    axes = list(data.grid)
    rows = [
        [
            "trial",
            *axes,
            "best epoch",
            "best val acc",
            "best val bal acc",
            "best val macro-F1",
            "final val acc",
            "final train acc",
            "s/epoch",
            "total s",
            "input",
        ]
    ]
    for t in data.trials:
        h = t["history"]
        derived = t["kind"] == "derived"
        source = f"in run {t['source_trial']}" if t.get("source_trial") is not None else "in its run"
        rows.append(
            [
                str(t["number"]),
                *(str(_value(t, a)) for a in axes),
                _best_epoch(t),
                _share(t["best"]["val_accuracy"], t.get("n_val")),
                _like(t["best"].get("val_balanced_accuracy"), t["best"]["val_accuracy"], t.get("n_val")),
                _like(t["best"].get("val_macro_f1"), t["best"]["val_accuracy"], t.get("n_val")),
                _share(h[-1]["val_accuracy"], t.get("n_val")),
                _share(h[-1]["train_accuracy"], t.get("n_train")),
                source if derived else f"{statistics.mean(r['seconds'] for r in h):.2f}",
                source if derived else f"{sum(r['seconds'] for r in h):.1f}",
                t["input_path"] + (" (shared run)" if derived else ""),
            ]
        )
    return Block("table", rows=rows)


# ------------------------------------------------------------------------------ replicates (seeds, folds)
def _metric(data: StudyData) -> str:
    return data.spec.get("metric", "val_accuracy")


def _configuration_axes(data: StudyData) -> list[str]:
    return [a for a in data.grid if a not in REPLICATE_AXES]


def configurations(data: StudyData) -> list[tuple[dict, list[dict]]]:
    """Each configuration (a grid point without its replicate axes) with its trials, in order of first trial."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for t in sorted(data.trials, key=lambda t: t["number"]):
        config = configuration_of(t["point"], replicate_axes(data.grid))
        groups.setdefault(json.dumps(config, sort_keys=True, default=str), (config, []))[1].append(t)
    return list(groups.values())


def _replicate_words(data: StudyData) -> str:
    """'3 replicates (seed 0, 1, 2)': how many replicates a configuration has, and what they are."""
    axes = replicate_axes(data.grid)
    n = math.prod(len(data.grid[a]) for a in axes)
    return (
        f"{n} replicate{'s' * (n != 1)} (" + "; ".join(f"{a} {', '.join(map(str, data.grid[a]))}" for a in axes) + ")"
    )


def _mean_std(values: list[float], metric: str, n_val: int | None) -> str:
    return _fmt(values) if metric == "val_loss" else _shares(values, n_val)


def interval_covers(data: StudyData) -> str:
    """What the spread of a configuration's replicates, and so a paired difference's interval, measures."""
    axes = replicate_axes(data.grid)
    if axes == ["seed"]:
        return (
            "The replicates are seeds on one fixed split: their spread, and the intervals, cover how training runs "
            "vary (initialisation, order, augmentation, dropout) measured on the same validation images, not how the "
            "figures would move on other images (the test accuracy's Wilson interval speaks to that)."
        )
    if axes == ["fold"]:
        return (
            "The replicates are cross-validation folds: each validates on other images, so their spread, and the "
            "intervals, cover both how training varies and which images are validated on (folds share most of "
            "their training images, so the intervals are somewhat optimistic)."
        )
    return (
        "The replicates are seeds and folds together: their spread, and the intervals, cover how training varies and "
        "which images are validated on (folds share most of their training images, so somewhat optimistically)."
    )


def configurations_table(data: StudyData) -> Block:
    """One row per configuration, best mean selection metric first: its n replicates and their mean ± std."""
    metric, axes = _metric(data), _configuration_axes(data)
    sign = 1 if higher_is_better(metric) else -1
    chosen = configuration_of(data.test["point"], replicate_axes(data.grid)) if data.test else None
    columns = ["val_accuracy"] + ([metric] if metric != "val_accuracy" else [])
    rows = [[*axes, "n", *(f"{c.replace('_', ' ')} (best epoch, mean ± std)" for c in columns), "selected"]]
    found = configurations(data)
    found.sort(key=lambda c: -sign * statistics.fmean(t["best"][metric] for t in c[1]))
    for config, trials in found:
        cells = [_mean_std([t["best"][c] for t in trials], c, _n_val(trials)) for c in columns]
        mark = "selected" if config == chosen else ""
        rows.append([*(str(config.get(a, "")) for a in axes), str(len(trials)), *cells, mark])
    return Block("table", rows=rows)


def _difference_metric(data: StudyData) -> str:
    """What paired differences compare, in points: the selection metric, or validation accuracy when that is the
    loss (a loss has no points)."""
    return _metric(data) if higher_is_better(_metric(data)) else "val_accuracy"


def _name(axis: str, value) -> str:
    return str(value) if axis in ("strategy", "variant", "arch") else f"{axis} {value}"


def paired_rows(data: StudyData) -> list[list[str]]:
    """Every two configurations that differ in one grid axis only, paired on their shared replicates: the later
    value of the axis (grid order) minus the earlier, in points of `_difference_metric`, and the verdict."""
    metric, axes, replicates = _difference_metric(data), _configuration_axes(data), replicate_axes(data.grid)
    found = configurations(data)

    def by_replicate(trials: list[dict]) -> dict[tuple, float | None]:
        return _by_replicate(trials, metric, replicates)

    rows = []
    for axis in axes:
        order = {json.dumps(v, default=str): i for i, v in enumerate(data.grid[axis])}
        rest: dict[str, list[tuple[dict, list[dict]]]] = defaultdict(list)
        for config, trials in found:
            others = {k: v for k, v in config.items() if k != axis}
            rest[json.dumps(others, sort_keys=True, default=str)].append((config, trials))
        for group in rest.values():
            group.sort(key=lambda c: order.get(json.dumps(c[0].get(axis), default=str), len(order)))
            for i, (first, first_trials) in enumerate(group):
                for second, second_trials in group[i + 1 :]:
                    a, b = by_replicate(second_trials), by_replicate(first_trials)
                    shared = sorted(set(a) & set(b))
                    if not shared or any(v is None for v in (*a.values(), *b.values())):
                        continue
                    d = paired_difference([a[k] for k in shared], [b[k] for k in shared])
                    name_a, name_b = _name(axis, second.get(axis)), _name(axis, first.get(axis))
                    held = ", ".join(f"{k} = {_value_text(v)}" for k, v in first.items() if k != axis) or "-"
                    rows.append([axis, held, f"{second.get(axis)} - {first.get(axis)}", str(d.n), format_difference(d),
                                 difference_verdict(name_a, name_b, d)])  # fmt: skip
    return rows


def replicate_blocks(data: StudyData) -> list[Block]:
    """With replicate axes: the configurations (mean ± std over replicates) and their paired differences."""
    if not replicate_axes(data.grid) or not data.trials:
        return []
    metric, diff_metric = _metric(data), _difference_metric(data)
    blocks = [
        Block("h2", "Configurations: mean over replicates"),
        Block(
            "p",
            f"A configuration is a grid point without its replicate axes; each has {_replicate_words(data)}. "
            f"Figures are each trial's best epoch, as mean ± sample standard deviation over the replicates; the "
            f"study selects the configuration of best mean {metric}. " + interval_covers(data),
        ),
        configurations_table(data),
    ]
    rows = paired_rows(data)
    if rows:
        blocks += [
            Block("h2", "Paired differences"),
            Block(
                "p",
                f"Configurations that differ in one grid axis, compared on the same replicates: the mean of the "
                f"per-replicate differences in {diff_metric} (best epoch), in percentage points, ± the half-width of "
                "its 95% t interval. The interval is the range of true mean differences consistent with these "
                "replicates at 95% confidence: when it contains 0, the replicates cannot tell the two apart "
                f'("no measurable difference"); with fewer than {MIN_REPLICATES} replicates no interval is stated '
                "(two values that happen to agree would claim a certainty they do not have). " + interval_covers(data),
            ),
            Block("table", rows=[["axis", "held fixed", "difference", "n", "points", "verdict"], *rows]),
        ]
    return blocks


def time_table(data: StudyData) -> tuple[Block, dict]:
    """Regime x batch size (x other axes): seconds per trained epoch, counting each run's epochs once.

    s/epoch = training + validation seconds summed over the runs / epochs they trained; one-off work (model
    setup with the frozen-feature pass, when the run recorded it) is a separate column."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for t in _runs(data):  # a search's trials: one group per search, not one per sampled setting
        groups[
            (_value(t, "strategy"), _setting(t, data, skip=("strategy", "epochs", "seed", *_searched(data))))
        ].append(t)
    order = {r: i for i, r in enumerate(_regimes(data))}
    rows = [
        ["regime", "setting", "runs", "epochs trained", "s/epoch", "training s", "setup s", "feature pass s (in setup)"]
    ]
    out = {}
    for key in sorted(groups, key=lambda k: (order[k[0]], _natural_setting(groups[k][0], data))):
        runs = groups[key]
        epochs = sum(len(t["history"]) for t in runs)
        training = sum(r["seconds"] for t in runs for r in t["history"])
        setups = [t["setup_seconds"] for t in runs if t.get("setup_seconds") is not None]
        features = [t["feature_seconds"] for t in runs if t.get("feature_seconds") is not None]
        out[key] = {"epochs": epochs, "training": training, "per_epoch": training / epochs if epochs else 0.0}
        rows.append(
            [
                key[0],
                key[1] or "-",
                str(len(runs)),
                str(epochs),
                _seconds(out[key]["per_epoch"]),
                _seconds(training),
                _seconds(sum(setups)) if setups else "not recorded",
                _seconds(sum(features)) if features else "not recorded",
            ]
        )
    return Block("table", rows=rows), out


def _searched(data: StudyData) -> list[str]:
    """The options the study's searches sample (none without [search])."""
    return [k.replace("-", "_") for k in data.spec.get("search", {}).get("space", {})]


def _natural_setting(t: dict, data: StudyData) -> tuple:
    return tuple(_natural(_value(t, a)) for a in data.grid if a not in ("strategy", "epochs", *REPLICATE_AXES))


def study_time_blocks(data: StudyData) -> list[Block]:
    """Wall time: the last `study run` as recorded, the trainings, the one-off work."""
    runs = _runs(data)
    training = sum(r["seconds"] for t in runs for r in t["history"])
    epochs = sum(len(t["history"]) for t in runs)
    walls = sum(t["wall_seconds"] for t in runs)
    lines = [
        f"{len(runs)} runs trained {epochs} epochs in all: {_seconds(training)} s of training and validation "
        f"({_duration(training)}); their trials took {_seconds(walls)} s of wall time ({_duration(walls)}) including "
        "setup, checkpoints and bookkeeping. Epochs of derived trials are those of their run and are not counted again."
    ]
    last = data.attrs.get("last_run")
    if last:
        lines.append(
            f"The last `study run` went from {last['started']} to {last['finished']}: {_duration(last['wall_seconds'])}"
            f" of wall time ({_seconds(last['wall_seconds'])} s), of which {_seconds(last['load_seconds'])} s loading "
            "the data in its own process. Trials trained by an earlier `study run` or by parallel workers make this "
            "differ from the trials' sum."
        )
    stopped = [t for s in data.searches for t in s.trials if t["stopped"]]
    if stopped:
        epochs = sum(len(t["history"]) for t in stopped)
        seconds = sum(r["seconds"] for t in stopped for r in t["history"])
        lines.append(
            f"The searches' {len(stopped)} pruned or diverged trials trained {epochs} more epochs "
            f"({_seconds(seconds)} s), not counted above."
        )
    if data.test and data.test.get("test_seconds") is not None:
        lines.append(f"The single test evaluation took {_seconds(data.test['test_seconds'])} s.")
    return [Block("p", text) for text in lines]


# ------------------------------------------------------------------------------ figures
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _shade(colour: str, i: int, n: int) -> tuple:
    """The i-th of n shades of a regime's colour, darkest first."""
    rgb = matplotlib.colors.to_rgb(colour)
    mix = 0.6 * i / max(n - 1, 1)
    return tuple(c + (1 - c) * mix for c in rgb)


MARKERS = "osD^vP*Xh"


def learning_curves(data: StudyData) -> bytes | None:
    """One column per regime (its colour); rows: accuracy, then one loss row per loss kind (ce and mse differ in
    scale). One line per run actually trained: derived trials are prefixes of it."""
    runs = _runs(data)
    if not runs or max(len(t["history"]) for t in runs) < 2:
        return None  # a single epoch is a dot, not a curve: the tables hold it
    strategies = _regimes(data)
    losses = sorted({t["config"].get("loss", "ce") for t in runs})
    fig, axes = plt.subplots(
        1 + len(losses), len(strategies), figsize=(4.2 * len(strategies), 2.8 * (1 + len(losses))), squeeze=False
    )
    for col, strategy in enumerate(strategies):
        mine = sorted((t for t in runs if _value(t, "strategy") == strategy), key=lambda t: _natural_setting(t, data))
        for i, t in enumerate(mine):
            colour, marker = _shade(_colour(strategy), i, len(mine)), MARKERS[i % len(MARKERS)]
            epochs = [r["epoch"] for r in t["history"]]
            # a search's trials differ in every sampled value: named by number (the All trials table has the values)
            label = f"trial {t['number']}" if data.searches else _setting(t, data, skip=("strategy", "epochs")) or "run"
            rows = [("accuracy", axes[0][col])]
            rows.append(("loss", axes[1 + losses.index(t["config"].get("loss", "ce"))][col]))
            for metric, ax in rows:
                ax.plot(epochs, [r[f"val_{metric}"] for r in t["history"]], "-", color=colour, marker=marker,
                        markersize=3, label=label if metric == "accuracy" else None)  # fmt: skip
                ax.plot(epochs, [r[f"train_{metric}"] for r in t["history"]], ":", color=colour, alpha=0.8)
        axes[0][col].set_title(strategy, color=_colour(strategy), fontweight="bold")
        axes[0][col].set_ylabel("accuracy")
        axes[0][col].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        for k, loss in enumerate(losses):
            axes[1 + k][col].set_ylabel(f"{loss} loss")
        axes[-1][col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if not ax.lines:  # this regime has no run of this loss kind
                ax.axis("off")
                ax.text(0.5, 0.5, f"no {ax.get_ylabel()} run", ha="center", va="center", transform=ax.transAxes)
        if len(mine) <= 8:  # below the column, out of the data
            handles, labels = axes[0][col].get_legend_handles_labels()
            axes[-1][col].legend(
                handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize=7, ncol=2, frameon=False
            )
    fig.suptitle("Learning curves per regime (solid: validation, dotted: train)")
    fig.tight_layout()
    return _png(fig)


def accuracy_vs_epochs(data: StudyData) -> bytes | None:
    """Final validation accuracy against the epoch budget, per batch size; None when there is one budget only or
    too many settings to tell apart (the tables and the variant chart hold them)."""
    epochs = _epochs_of(data)
    if len(epochs) < 2:
        return None
    # a panel needs two epoch budgets to draw a line, not dots
    budgets = defaultdict(set)
    for t in data.trials:
        budgets[_value(t, "batch_size")].add(_value(t, "epochs"))
    batch_sizes = sorted(bs for bs, found in budgets.items() if len(found) > 1)
    if not batch_sizes:
        return None
    series: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for t in data.trials:
        name = _setting(t, data, skip=("strategy", "batch_size", "epochs", *REPLICATE_AXES))
        series[(_value(t, "batch_size"), _value(t, "strategy"), name)][_value(t, "epochs")].append(
            _final_row(t)["val_accuracy"]
        )
    names = sorted({k[2] for k in series})
    if len(names) * len(_regimes(data)) > 9:
        return None
    fig, axes = plt.subplots(
        1, len(batch_sizes), figsize=(4.2 * len(batch_sizes) + 1.5, 3.4), squeeze=False, sharey=True
    )
    for col, bs in enumerate(batch_sizes):
        ax = axes[0][col]
        for strategy in _regimes(data):
            for j, name in enumerate(names):
                by_epoch = series.get((bs, strategy, name))
                if not by_epoch:
                    continue
                xs = sorted(by_epoch)
                label = strategy + (f" ({name})" if name else "")
                ax.plot(xs, [statistics.mean(by_epoch[x]) for x in xs], marker=MARKERS[j % len(MARKERS)],
                        linestyle=("-", "--", ":", "-.")[j % 4], color=_colour(strategy), label=label)  # fmt: skip
        ax.set_title(f"batch size {bs}")
        ax.set_xticks(epochs)
        ax.set_xlabel("epochs")
        ax.grid(alpha=0.3)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0][0].set_ylabel("validation accuracy (last epoch)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def variant_chart(data: StudyData) -> bytes | None:
    """Each variant's difference in best validation accuracy against the baseline, per regime, sorted."""
    variants = list(data.grid.get("variant", []))
    if len(variants) < 2:
        return None
    base, means = _baseline(variants), _variant_means(data)
    strategies = _regimes(data)
    diffs = {
        v: {s: means[(v, s)] - means[(base, s)] for s in strategies if (v, s) in means and (base, s) in means}
        for v in variants
        if v != base
    }
    order = sorted(diffs, key=lambda v: statistics.mean(diffs[v].values()) if diffs[v] else 0.0)
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.32 * len(order)))
    for y, v in enumerate(order):
        ax.plot([min(diffs[v].values(), default=0) * 100, max(diffs[v].values(), default=0) * 100], [y, y],
                color="#cccccc", zorder=1)  # fmt: skip
        for s, d in diffs[v].items():
            ax.scatter(100 * d, y, color=_colour(s), s=28, zorder=2, label=s if y == 0 else None)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(order)), [str(v) for v in order], fontsize=8)
    ax.set_xlabel(f"best validation accuracy minus {base}'s (percentage points)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def timing_plot(data: StudyData, times: dict) -> bytes | None:
    """Seconds per trained epoch, one bar per regime and setting (regime colours); None for a single bar."""
    if len(times) < 2:
        return None
    keys = list(times)
    fig, ax = plt.subplots(figsize=(6.5, 1.0 + 0.3 * len(keys)))
    ax.barh(range(len(keys)), [times[k]["per_epoch"] for k in keys], color=[_colour(k[0]) for k in keys])
    ax.set_yticks(range(len(keys)), [f"{k[0]}, {k[1]}" if k[1] else k[0] for k in keys], fontsize=8)
    for y, k in enumerate(keys):  # short bars stay readable
        ax.text(times[k]["per_epoch"], y, f" {_seconds(times[k]['per_epoch'])} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    ax.set_xlabel("seconds per epoch (training + validation)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def class_counts_table(t: dict) -> list[Block]:
    """Images per class in each split of the selected trial's data (none for selections recorded before)."""
    counts = t.get("class_counts")
    if not counts:
        return []
    splits = ["train", "val", "test"]
    rows = [["class", *splits, "all"]]
    for c in counts["train"]:
        n = [counts[s][c] for s in splits]
        rows.append([c, *map(str, n), str(sum(n))])
    totals = [sum(counts[s].values()) for s in splits]
    rows.append(["all", *map(str, totals), str(sum(totals))])
    return [Block("p", "Images per class and split (the selected trial's data):"), Block("table", rows=rows)]


def _metric_value(value: float, metric: str, n: int | None) -> str:
    return f"{value:.4f}" if metric == "val_loss" else _share(value, n)


def _selection_n_val(t: dict) -> int | None:
    """The validation images of the selected trial (older selections: from its class counts, if recorded)."""
    if t.get("n_val"):
        return t["n_val"]
    counts = (t.get("class_counts") or {}).get("val")
    return sum(counts.values()) if counts else None


def tie_words(t: dict) -> str:
    """The selection's tie in words, or "" when the metric decided."""
    tie = t.get("tie")
    if not tie:
        return ""
    what = "configurations" if t.get("configuration") else "trials"
    return f"a tie on {t['metric']} with {what} {', '.join(map(str, tie['tied']))}, broken by {tie['broken_by']}"


def selection_blocks(t: dict, n_evaluations: int) -> list[Block]:
    """The selected trial, and its test evaluation (or why there is none)."""
    n_val = _selection_n_val(t)
    rows = [
        ["", "value"],
        ["trial", f"{t['trial']} ({t['key']})"],
        ["selection metric", t["metric"] + (f" ({tie_words(t)})" if tie_words(t) else "")],
        ["validation accuracy (best epoch)", _share(t["val_accuracy"], n_val)],
        ["validation loss (best epoch)", f"{t['val_loss']:.4f}"],
    ]
    if t.get("val_balanced_accuracy") is not None:  # absent from selections recorded before these metrics
        rows.append(["validation balanced accuracy (best epoch)", _like(t["val_balanced_accuracy"], t["val_accuracy"],
                                                                        n_val)])  # fmt: skip
        rows.append(["validation macro-F1 (best epoch)", _like(t["val_macro_f1"], t["val_accuracy"], n_val)])
    if n_val:
        rows.append(["validation images", str(n_val)])
    blocks = [Block("h2", "Selected trial and test evaluation"), Block("table", rows=rows)]
    conf = t.get("configuration")
    if conf:  # chosen by its mean over replicates; the row `trial` is the replicate whose checkpoint was tested
        mean = _metric_value(conf["mean"], t["metric"], n_val)
        rows[1:1] = [
            ["configuration", conf["key"]],
            [f"mean {t['metric']} over its {len(conf['trials'])} replicates", mean],
            ["its replicates (trials)", ", ".join(map(str, conf["trials"]))],
        ]
        rows[4][0] = f"trial tested (its replicate of best {t['metric']})"
    counts = class_counts_table(t)
    if t.get("test_accuracy") is None:
        rows.append(["test", "no test split (test_fraction = 0): not evaluated on a test set"])
        return blocks + counts
    n_test, accuracy = t["n_test"], t["test_accuracy"]
    drop = min(interval_decimals(round(accuracy * n_test), n_test),
               interval_decimals(round(t["val_accuracy"] * n_val), n_val) if n_val else 1)  # fmt: skip
    rows += [
        ["test accuracy", _test_accuracy(t)],
        *([["test balanced accuracy", _like(t["test_balanced_accuracy"], accuracy, n_test)]]
          if "test_balanced_accuracy" in t else []),
        *([["test macro-F1", _like(t["test_macro_f1"], accuracy, n_test)]] if "test_macro_f1" in t else []),
        ["test loss", f"{t['test_loss']:.4f}"],
        ["drop from validation", f"{100 * (t['val_accuracy'] - accuracy):+.{drop}f} pp"],
        ["test images", str(n_test)],
        ["test evaluations recorded", str(n_evaluations)],
    ]  # fmt: skip
    per_class = [
        [c, str(sum(row)), percent_with_interval(row[i], sum(row)) if sum(row) else "-"]
        for i, (c, row) in enumerate(zip(t["per_class_accuracy"], t["confusion_matrix"]))
    ]
    blocks.append(Block("table", rows=[["class", "test images", "test accuracy (95% CI)"], *per_class]))
    blocks += counts
    blocks += error_analysis_blocks(t) + calibration_blocks(t)
    return blocks


# ------------------------------------------------------------------------------ error analysis and calibration
def normalised_confusion_plot(t: dict) -> bytes:
    """Rows normalised to their true class, with a colour scale; cells show the row's % and the count."""
    matrix, classes = t["confusion_matrix"], t["classes"]
    rates = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in matrix]
    k = len(classes)
    fig, ax = plt.subplots(figsize=(2 + 0.7 * k, 1.2 + 0.6 * k))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            colour = "white" if rates[i][j] > 0.5 else "black"
            ax.text(j, i, f"{100 * rates[i][j]:.0f}%\n{v}", ha="center", va="center", fontsize=7, color=colour)
    return _png(fig)


def confused_pairs(t: dict, top: int = 5) -> list[tuple[str, str, int, float]]:
    """The `top` largest off-diagonal cells of the confusion matrix: (true, predicted, count, fraction of the true
    class), largest count first (ties: matrix order)."""
    matrix, classes = t["confusion_matrix"], t["classes"]
    cells = [
        (classes[i], classes[j], v, v / sum(row))
        for i, row in enumerate(matrix)
        for j, v in enumerate(row)
        if i != j and v > 0
    ]
    return sorted(cells, key=lambda c: -c[2])[:top]


def _decode_png(text: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text)))


def gallery_plot(errors: dict, classes: list[str]) -> bytes:
    mistakes = errors["mistakes"]
    cols = min(len(mistakes), 4)
    rows = -(-len(mistakes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes):
        ax.imshow(_decode_png(m["thumbnail"]), interpolation="nearest")
        ax.set_title(
            f"true {classes[m['true']]}\npred {classes[m['predicted']]} {m['confidence']:.2f}"
            f" (cal. {m['confidence_calibrated']:.2f})",
            fontsize=7,
        )
    return _png(fig)


def gradcam_plot(errors: dict, classes: list[str]) -> bytes:
    mistakes = [m for m in errors["mistakes"] if "gradcam" in m]
    fig, axes = plt.subplots(2, len(mistakes), figsize=(2.3 * len(mistakes), 4.8), squeeze=False)
    for col, m in enumerate(mistakes):
        image, cam = _decode_png(m["thumbnail"]), np.asarray(_decode_png(m["gradcam"])) / 255
        axes[0][col].imshow(image, interpolation="nearest")
        axes[0][col].set_title(f"true {classes[m['true']]}\npred {classes[m['predicted']]}", fontsize=7)
        axes[1][col].imshow(image, interpolation="nearest")
        overlay = axes[1][col].imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        axes[1][col].set_title(f"Grad-CAM of {classes[m['predicted']]}", fontsize=7)
        for ax in axes[:, col]:
            ax.axis("off")
    fig.colorbar(overlay, ax=axes[1].tolist(), fraction=0.046, pad=0.04)
    return _png(fig)


def error_analysis_blocks(t: dict) -> list[Block]:
    """Selected trial, test split: row-normalised confusion matrix, per-class precision / recall / F1, the most
    confused pairs, the most confident mistakes and Grad-CAM maps of a few (what the selection recorded)."""
    blocks = [
        Block("h3", "Error analysis (test split)"),
        Block(
            "figure",
            "Confusion matrix of the selected trial on the test split, each row normalised to its true class "
            "(cells: % of the true class, then the count)",
            png=normalised_confusion_plot(t),
        ),
    ]
    if t.get("per_class"):  # absent from selections recorded before
        rows = [["class", "test images", "precision", "recall", "F1"]]  # "-": undefined (nothing predicted / no image)
        predicted = [sum(column) for column in zip(*t["confusion_matrix"])]
        for i, (c, v) in enumerate(t["per_class"].items()):
            rows.append([c, str(v["support"]), _share(v["precision"], predicted[i], "-"),
                         _share(v["recall"], v["support"], "-"),
                         _like(v["f1"], v["recall"] or 0.0, v["support"]) or "-"])  # fmt: skip
        blocks += [Block("p", "Per-class precision, recall and F1 on the test split:"), Block("table", rows=rows)]
    pairs = confused_pairs(t)
    if pairs:
        rows = [["true class", "predicted as", "images", "% of the true class"]]
        rows += [[a, b, str(n), _share(f, sum(t["confusion_matrix"][t["classes"].index(a)]), missing="-")]
                 for a, b, n, f in pairs]  # fmt: skip
        blocks += [Block("p", f"The {len(pairs)} most confused pairs (largest off-diagonal cells):")]
        blocks.append(Block("table", rows=rows))
    else:
        blocks.append(Block("p", "No test image was misclassified."))
    errors = t.get("errors")
    if errors and errors["mistakes"]:
        shown = len(errors["mistakes"])
        blocks.append(
            Block(
                "figure",
                f"The {shown} most confident mistakes of {errors['n_mistakes']} misclassified test images "
                "(confidence of the predicted class, before and after temperature scaling)",
                png=gallery_plot(errors, t["classes"]),
            )
        )
        size = "x".join(map(str, errors["gradcam_map_size"]))
        note = (
            f"; its feature map is {size} at this resolution, so the map is uniform and says nothing about where"
            if errors["gradcam_map_size"] and max(errors["gradcam_map_size"]) == 1
            else ""
        )
        blocks.append(
            Block(
                "figure",
                f"Grad-CAM of the predicted class on the first mistakes (layer {errors['gradcam_layer']}, "
                f"{_gradcam_layer_kind(errors['gradcam_layer'])}{note})",
                png=gradcam_plot(errors, t["classes"]),
            )
        )
    return blocks


def _gradcam_layer_kind(layer: str) -> str:
    if layer.startswith("blocks.") and layer.endswith(".norm1"):
        return "the last transformer block's input norm, its patch tokens on the patch grid"
    return "the last convolution before the head"


def reliability_plot(calibration: dict) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, key, title in zip(
        axes,
        ("reliability", "reliability_calibrated"),
        (
            f"before: ECE {calibration['ece']:.4f}",
            f"after T = {calibration['temperature']:.3f}: ECE {calibration['ece_calibrated']:.4f}",
        ),
    ):
        r = calibration[key]
        width = 1 / r["bins"]
        lefts = [i * width for i in range(r["bins"])]
        full = [(x, a, c, n) for x, a, c, n in zip(lefts, r["accuracy"], r["confidence"], r["count"]) if n]
        ax.bar([x for x, *_ in full], [a for _, a, _, _ in full], width, align="edge", edgecolor="k", label="accuracy")
        ax.bar([x for x, *_ in full], [c - a for _, a, c, _ in full], width, bottom=[a for _, a, _, _ in full],
               align="edge", color="tab:red", alpha=0.3, label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for x, a, c, n in full:
            ax.text(x + width / 2, max(a, c) + 0.02, str(n), ha="center", fontsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("confidence (top-1)")
        ax.set_title(title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    return _png(fig)


def calibration_blocks(t: dict) -> list[Block]:
    """ECE and NLL of the selected trial on the test split before and after temperature scaling, and the
    reliability diagrams (absent from selections recorded before)."""
    c = t.get("calibration")
    if not c:
        return []
    low, high = c.get("temperature_range", (0.0, math.inf))
    at_bound = not low * 1.001 < c["temperature"] < high * 0.999
    fit = c.get("fit") or {}
    kept = fit and not fit.get("fitted")
    shown = "1 (not fitted)" if kept else f"{c['temperature']:.3g}" + (" (the search's bound)" if at_bound else "")
    accuracy = _share(t["test_accuracy"], t["n_test"])
    rows = [
        ["test split", "before", "after temperature scaling"],
        ["temperature", "1", shown],
        [f"ECE ({c['reliability']['bins']} bins)", f"{c['ece']:.4f}", f"{c['ece_calibrated']:.4f}"],
        ["NLL", f"{c['nll']:.4f}", f"{c['nll_calibrated']:.4f}"],
        ["accuracy", accuracy, accuracy],
    ]
    how = (
        f"No temperature was fitted: {fit['reason']}; T stays 1 (no scaling), so the columns agree. "
        if kept
        else "The temperature T was fitted after training on the validation split (the NLL of softmax(logits / T) "
        "of the selected checkpoint, minimised over T, where the validation images can support it: 50 or more, "
        "not all classified correctly, the minimum inside the search's range). "
    )
    text = how + (
        "predict uses it. It does not change which class is predicted, so accuracy is the same. Validation figures "
        "recorded during training, and the selection, are those of the uncalibrated model. Expected calibration "
        "error: top-1 confidence in equal-width bins, the image-weighted mean of |accuracy - confidence|."
    )
    return [
        Block("h3", "Calibration (test split)"),
        Block("p", text),
        Block("table", rows=rows),
        Block(
            "figure",
            "Reliability diagrams of the selected trial on the test split, before and after temperature scaling "
            "(accuracy per confidence bin; the number above each bar is its image count)",
            png=reliability_plot(c),
        ),
    ]


# ------------------------------------------------------------------------------ summary and reuse
def _selected_trial(data: StudyData) -> dict | None:
    if not data.test:
        return None
    if data.test.get("identity"):  # trial numbers repeat across a study's searches; identities do not
        return next((t for t in data.trials if t.get("identity") == data.test["identity"]), None)
    return next((t for t in data.trials if t["number"] == data.test["trial"]), None)


def summary_blocks(data: StudyData) -> list[Block]:
    table, cells = summary_table(data)
    several = len({_setting(t, data) for t in data.trials}) > 1  # a setting to name
    blocks = [
        Block("h2", "Summary"),
        Block(
            "p",
            "Best validation accuracy per regime and epoch budget, at each trial's best epoch"
            + (", of the best setting (in brackets)" if several else "")
            + (f"; the mean ± std over {_replicate_words(data)}" if replicate_axes(data.grid) else "")
            + ".",
        ),
        table,
    ]
    t = data.test
    if t:
        conf, n_val = t.get("configuration"), _selection_n_val(t)
        if conf:
            text = (
                f"Selected by mean {t['metric']} over replicates: configuration {conf['key']} "
                f"(mean {_metric_value(conf['mean'], t['metric'], n_val)} over {len(conf['trials'])} replicates); "
                f"tested with the checkpoint of its replicate of best {t['metric']}, trial {t['trial']} ({t['key']}), "
                f"validation accuracy {_share(t['val_accuracy'], n_val)}"
            )
        else:
            text = (
                f"Selected by {t['metric']}: trial {t['trial']} ({t['key']}), "
                f"validation accuracy {_share(t['val_accuracy'], n_val)}"
            )
        if t.get("test_accuracy") is not None:
            text += f"; test accuracy {_test_accuracy(t)} on {t['n_test']} test images"
            n = data.n_test_evaluations
            text += " (the test split evaluated once)." if n == 1 else f" ({n} test evaluations recorded)."
            text += " " + WILSON_NOTE + small_test_note(t)
        else:
            text += "; not evaluated on a test set (no test split)."
        blocks.append(Block("p", text))
        certainty = " ".join(text for text in (chance_warning(t), selection_certainty(data)) if text)
        if certainty:
            blocks.append(Block("p", certainty))
        blocks += use_model_blocks(data)
    return blocks


WIDE = 10.0  # points: a test interval wider than this either way says the test split is too small to rank models


def small_test_note(t: dict) -> str:
    low, high = wilson_interval(round(t["test_accuracy"] * t["n_test"]), t["n_test"])
    half = 100 * max(t["test_accuracy"] - low, high - t["test_accuracy"])
    if half <= WIDE:
        return ""
    return (
        f" With {t['n_test']} test images the interval reaches {half:.0f} points from the figure: too few to tell "
        "models a few points apart."
    )


def _by_replicate(trials: list[dict], metric: str, replicates: list[str]) -> dict[tuple, float | None]:
    """A configuration's metric per replicate (its seed / fold values), in points for rates, as recorded for a loss."""
    scale = 100 if higher_is_better(metric) else 1
    values = {tuple(str(t["point"].get(a)) for a in replicates): t["best"].get(metric) for t in trials}
    return {k: None if v is None else scale * v for k, v in values.items()}


def selection_certainty(data: StudyData) -> str:
    """How sure the selection is: a tie it broke, and the configurations it is not measurably better than (its lead
    over them within the replicates' noise, or too few replicates to say), or that one run per configuration
    measured no noise at all."""
    t = data.test
    sentences = [f"The selection was {tie_words(t)}."] if tie_words(t) else []
    metric, replicates = _metric(data), replicate_axes(data.grid)
    if not replicates:
        selected = _selected_trial(data)
        if any(x is not selected for x in data.trials):
            sentences.append(
                "Each configuration ran once, so how far the selected trial's lead over the others lies above the "
                f"variation between training runs is not measured (repeat = {MIN_REPLICATES} or folds measure it)."
            )
        return " ".join(sentences)
    chosen = configuration_of(t["point"], replicates)
    sign = 1 if higher_is_better(metric) else -1
    found = configurations(data)
    mine = next((trials for config, trials in found if config == chosen), None)
    if mine is None:
        return " ".join(sentences)
    a = _by_replicate(mine, metric, replicates)
    close = []
    for config, trials in found:
        b = _by_replicate(trials, metric, replicates)
        shared = sorted(k for k in set(a) & set(b) if a[k] is not None and b[k] is not None)
        if config == chosen or not shared:
            continue
        d = paired_difference([sign * a[k] for k in shared], [sign * b[k] for k in shared])
        if not (d.measurable and d.mean > 0):
            unit = "points" if sign > 0 else metric
            how = "too few replicates for an interval" if d.half_width is None else "the interval contains 0"
            close.append(f"{point_key_text(config)} ({format_difference(d)} {unit}; {how})")
    if close:
        sentences.append(
            f"On these replicates the selection is not measurably better than {'; '.join(close)}: choosing between "
            "them was a coin flip. " + interval_covers(data)
        )
    return " ".join(sentences)


def point_key_text(config: dict) -> str:
    return ", ".join(f"{k} = {_value_text(v)}" for k, v in config.items()) or "the other configuration"


def _quote(path: str | Path) -> str:
    return shlex.quote(str(path))


def use_model_blocks(data: StudyData) -> list[Block]:
    """Where the selected checkpoint is and the commands that use it."""
    trial = _selected_trial(data)
    if trial is None or not trial["checkpoint"] or data.directory is None:
        return []
    found = (data.directory / trial["checkpoint"]).resolve()
    ckpt = trial["checkpoint"]  # relative to the study directory: a report shows no machine's own folders
    config = trial["config"]
    if config.get("labels"):
        source = f"--labels {_quote(_from_study(config['labels'], data))}"
    else:
        source = f"--data {_quote(_from_study(config['data'], data) if config['data'] != 'cifar10' else 'cifar10')}"
        if config.get("data_dir"):
            source += f" --data-dir {_quote(_from_study(config['data_dir'], data))}"
    commands = [
        f"transferlab predict {_quote(ckpt)} images/",
        f"transferlab evaluate {_quote(ckpt)} {source}",
        f"transferlab export {_quote(ckpt)} --format onnx -o model.onnx",
    ]
    exists = "" if found.is_file() else " (not found where the report was written: the study directory was moved?)"
    blocks = [Block("h3", "Use this model")]
    warning = chance_warning(data.test)
    if warning:
        blocks.append(Block("p", warning))
    return blocks + [
        Block(
            "p",
            f"Checkpoint, in the study directory: {trial['checkpoint']}{exists}. From the study directory "
            "(the spec's relative paths made relative to it; absolute ones as given):",
        ),  # fmt: skip
        Block("code", "\n".join(commands)),
        Block("p", "evaluate scores the run's own test split by default; give other data to score that instead."),
    ]


def _from_study(value: str, data: StudyData) -> str:
    """A path of the spec, as seen from the study directory: relative ones (relative to where the study was run)
    made relative to the study directory, absolute ones as the user gave them."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    # abspath, not resolve: a symlink on the way (../shared -> /mnt/data) stays as the user named it
    return os.path.relpath(os.path.abspath(run_from(data)[0] / path), os.path.abspath(data.directory))


def chance(t: dict) -> float | None:
    """What always answering the test split's most common class scores (1 / classes when they are balanced)."""
    counts = (t.get("class_counts") or {}).get("test")
    if counts and sum(counts.values()):
        return max(counts.values()) / sum(counts.values())
    return 1 / len(t["classes"]) if t.get("classes") else None


def chance_warning(t: dict | None) -> str:
    """A warning when the selected model's test accuracy interval reaches chance: it is not shown to beat guessing."""
    if not t or t.get("test_accuracy") is None:
        return ""
    level = chance(t)
    low, _ = wilson_interval(round(t["test_accuracy"] * t["n_test"]), t["n_test"])
    if level is None or low > level:
        return ""
    return (
        f"Warning: the test accuracy's 95% interval ({_test_accuracy(t)}) reaches down to chance, "
        f"{100 * level:.0f}% (always answering the most common class): on {t['n_test']} test images this model is "
        "not shown to do better than guessing."
    )


# ------------------------------------------------------------------------------ reproduce
PATH_KEYS = ("data", "labels", "data_dir", "cache_dir", "weights")
NOT_PATHS = {"data": ("cifar10",), "weights": ("imagenet", "none")}


def run_from(data: StudyData) -> tuple[Path, str]:
    """The directory relative paths of the spec are relative to, and how it is known."""
    if data.attrs.get("cwd"):
        return Path(data.attrs["cwd"]), "the directory the study was run from"
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
        fix = key in PATH_KEYS and isinstance(value, str) and value not in NOT_PATHS.get(key, ())
        if key in PATH_KEYS and isinstance(value, list):
            out[key] = [_absolute(v, data) if isinstance(v, str) and v not in NOT_PATHS.get(key, ()) else v
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
    from .version import build_info

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
    ran = data.attrs.get("software", {})
    if ran:
        rows.append(["transferlab that ran the study", ran.get("version", "")])
        if ran.get("commit"):
            rows.append(["its git commit", ran["commit"]])
    now = build_info()
    rows.append(["transferlab that wrote this report", now["version"]])
    if now.get("commit"):
        rows.append(["its git commit", now["commit"]])
    rows.append(["report written", time.strftime("%Y-%m-%d %H:%M:%S %Z")])
    if data.attrs.get("last_run"):
        rows.append(["last study run", f"{data.attrs['last_run']['started']} to {data.attrs['last_run']['finished']}"])
    trial = _selected_trial(data) or (data.trials[0] if data.trials else None)
    if trial:
        config = trial["config"]
        source = config.get("labels") or config.get("data", "")
        rows.append(["data source", source if source == "cifar10" else _absolute(source, data)])
        rows.append(["data fingerprint", _data_key(data, trial)])
    blocks.append(Block("table", rows=rows))
    if data.environment:
        blocks.append(Block("table", rows=[["environment", ""]] + [[k, str(v)] for k, v in data.environment.items()]))
    return blocks


def _data_key(data: StudyData, trial: dict) -> str:
    if data.directory is None or not trial["run_dir"]:
        return "not recorded"
    metrics = data.directory / trial["run_dir"] / "metrics.json"
    if not metrics.is_file():
        return "not recorded"
    return str(json.loads(metrics.read_text()).get("data", "not recorded"))


# ------------------------------------------------------------------------------ backbones: accuracy against cost
def pareto_front(points: list) -> list:
    """The points no other point dominates, by cost (ascending). A point is (cost, accuracy, ...anything); q dominates
    p when q costs no more and is no less accurate, and is cheaper or more accurate. Equal points are all kept."""
    front = [
        p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)
    ]
    return sorted(front, key=lambda p: (p[0], -p[1]))


def _archs(data: StudyData) -> list[str]:
    return sorted({str(_value(t, "arch")) for t in data.trials})


@dataclass
class BackbonePoint:
    """One backbone x regime: its most accurate trial (best validation accuracy) and that trial's run cost."""

    arch: str
    regime: str
    trial: dict
    cost: dict | None
    values: list[float] = field(default_factory=list)  # with replicates: its configuration's, one per replicate

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.values) if self.values else self.trial["best"]["val_accuracy"]

    @property
    def gflops(self) -> float | None:
        return self.cost["flops"] / 1e9 if self.cost else None

    @property
    def seconds_per_epoch(self) -> float:
        history = self.trial["history"]
        return sum(r["seconds"] for r in history) / len(history)


def backbone_points(data: StudyData) -> list[BackbonePoint]:
    """Per backbone x regime, in backbone then regime order, the trial of best validation accuracy (lowest number
    on a tie) with its cost record (None for trials recorded before costs were). With replicates, the configuration
    of best mean validation accuracy, its best replicate's trial and the replicates' values."""
    out = []
    for arch in _archs(data):
        for regime in _regimes(data):
            mine = [
                trials
                for _, trials in configurations(data)
                if str(_value(trials[0], "arch")) == arch and _value(trials[0], "strategy") == regime
            ]
            if mine:
                values = max(mine, key=lambda ts: (statistics.fmean(t["best"]["val_accuracy"] for t in ts),
                                                   -ts[0]["number"]))  # fmt: skip
                best = max(values, key=lambda t: (t["best"]["val_accuracy"], -t["number"]))
                out.append(
                    BackbonePoint(arch, regime, best, best.get("cost"), [t["best"]["val_accuracy"] for t in values])
                )
    return out


def _rate(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:,.1f}"


def backbone_table(data: StudyData, points: list[BackbonePoint]) -> Block:
    rows = [
        ["backbone", "regime", "trial", "resolution", "parameters", "trainable parameters", "GFLOPs/image",
         "training img/s", "inference img/s", "s/epoch", "best val accuracy", "test accuracy (selected)"]
    ]  # fmt: skip
    selected = data.test or {}
    chosen = _selected_trial(data)
    for p in points:
        c = p.cost
        test = ""
        if chosen is not None and selected.get("test_accuracy") is not None:
            if (str(_value(chosen, "arch")), _value(chosen, "strategy")) == (p.arch, p.regime):
                test = f"{_test_accuracy(selected)} (trial {selected['trial']})"
        rows.append(
            [
                p.arch,
                p.regime,
                str(p.trial["number"]),
                str(c["resolution"] if c else _value(p.trial, "resolution")),
                f"{c['params']:,}" if c else "not recorded",
                f"{c['trainable_params']:,}" if c else "not recorded",
                f"{p.gflops:.4g}" if c else "not recorded",
                _rate(c.get("train_images_per_second") if c else None),
                _rate(c.get("inference_images_per_second") if c else None),
                f"{p.seconds_per_epoch:.3g}" if p.seconds_per_epoch < 10 else _seconds(p.seconds_per_epoch),
                _shares(p.values or [p.accuracy], p.trial.get("n_val")),
                test,
            ]
        )
    return Block("table", rows=rows)


def _ratio(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def backbone_prose(points: list[BackbonePoint]) -> str:
    """What the table shows, in words: the most accurate point and the cheaper points on the FLOPs front."""
    best = max(points, key=lambda p: (p.accuracy, -p.trial["number"]))
    text = (
        f"On this study's data, {best.arch} in regime {best.regime} is the most accurate "
        f"({_shares(best.values or [best.accuracy], best.trial.get('n_val'))} best validation accuracy"
        + (f", {best.gflops:.4g} GFLOPs/image)." if best.gflops is not None else ").")
    )
    costed = [p for p in points if p.gflops]
    if best.gflops:
        front = pareto_front([(p.gflops, p.accuracy, i) for i, p in enumerate(costed)])
        cheaper = [costed[i] for _, _, i in front if costed[i].gflops < best.gflops]
        for p in cheaper:
            fewer = _ratio(best.gflops / p.gflops)
            less = _points([best.accuracy - p.accuracy], p.trial.get("n_val"), [p.accuracy])
            text += (
                f" {p.arch} in regime {p.regime} is on the accuracy-vs-FLOPs front at {fewer}x fewer FLOPs "
                f"({_shares(p.values or [p.accuracy], p.trial.get('n_val'))}, {less.lstrip('+')} less)."
            )
    return text


LABEL_OFFSETS = (((5, 4), "left"), ((-5, 4), "right"), ((5, -10), "left"), ((-5, -10), "right"))


def accuracy_vs_cost(points: list[BackbonePoint]) -> bytes | None:
    """Best validation accuracy of each backbone x regime against GFLOPs/image and against s/epoch (log x axes):
    regime colours, a marker per backbone, each panel's Pareto front as a dashed step line."""
    points = [p for p in points if p.gflops]
    if len(points) < 2:
        return None
    archs = sorted({p.arch for p in points})
    regimes = list(dict.fromkeys(p.regime for p in points))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = [(axes[0], "gflops", "GFLOPs per image (forward, one image; log)"),
              (axes[1], "seconds_per_epoch", "seconds per epoch, training + validation (log)")]  # fmt: skip
    for ax, attr, label in panels:
        shown = [p for p in points if getattr(p, attr) > 0]  # a log axis has no 0
        for p in shown:
            x = getattr(p, attr)
            ax.scatter(x, 100 * p.accuracy, color=_colour(p.regime), marker=MARKERS[archs.index(p.arch) % len(MARKERS)],
                       s=50, zorder=3, edgecolor="black", linewidth=0.5)  # fmt: skip
            # regimes of one backbone share its FLOPs: their labels go to different sides
            (dx, dy), ha = LABEL_OFFSETS[regimes.index(p.regime) % len(LABEL_OFFSETS)]
            ax.annotate(f"{p.arch}/{p.regime}", (x, 100 * p.accuracy), textcoords="offset points", xytext=(dx, dy),
                        ha=ha, fontsize=7)  # fmt: skip
        front = pareto_front([(getattr(p, attr), 100 * p.accuracy) for p in shown])
        xs, ys = [f[0] for f in front], [f[1] for f in front]
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, zorder=2, label="Pareto front")
        ax.set_xscale("log")
        ax.margins(x=0.35, y=0.08)  # room for the labels left of a point
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a short range
        ax.set_xlabel(label)
        ax.set_ylabel("best validation accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    handles = [matplotlib.lines.Line2D([], [], linestyle="", marker="o", color=_colour(r), label=r)
               for r in dict.fromkeys(p.regime for p in points)]  # fmt: skip
    handles += [matplotlib.lines.Line2D([], [], linestyle="", marker=MARKERS[i % len(MARKERS)], color="grey", label=a)
                for i, a in enumerate(archs)]  # fmt: skip
    handles.append(matplotlib.lines.Line2D([], [], color="black", linestyle="--", label="Pareto front"))
    fig.suptitle("Accuracy against cost, one point per backbone x regime")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    return _png(fig)


def backbone_blocks(data: StudyData) -> list[Block]:
    """The Backbones section: only when the trials differ in arch."""
    if len(_archs(data)) < 2:
        return []
    points = backbone_points(data)
    blocks = [
        Block("h2", "Backbones"),
        Block(
            "p",
            "Per backbone and regime, the trial of best validation accuracy and the cost of its run: parameters "
            "(all / those the regime trains), GFLOPs of one forward pass of one image at the run's resolution "
            "(a multiply-add counts 2), training images per second (training images x epochs / the epochs' "
            "training + validation seconds), inference images per second (the whole model in eval mode, "
            "the median of a few timed batches of "
            + ", ".join(sorted({str(p.cost["inference_batch"]) for p in points if p.cost}) or ["?"])
            + " on "
            + ", ".join(sorted({p.cost["inference_device"] for p in points if p.cost}) or ["?"])
            + "), seconds per epoch of that trial. Frozen prefixes whose output is cached (features.py) run once "
            "per image before the first epoch, as setup: the epochs, and so the training img/s, do not include "
            "them (the Time section's setup column does).",
        ),
        backbone_table(data, points),
        Block("p", backbone_prose(points)),
    ]
    _figure(blocks, "Best validation accuracy against GFLOPs/image and s/epoch; dashed: the Pareto front",
            accuracy_vs_cost(points))  # fmt: skip
    return blocks


def lr_found_blocks(data: StudyData) -> list[Block]:
    """lr = "find": the rate the range test chose per configuration, and its curves."""
    from .lr_find import curves_figure, figure_png

    if not data.lr_found:
        return []
    rows = [["configuration", "lr found", "steps", "stopped early"]]
    curves = []
    for f in data.lr_found:
        finding = f.get("finding") or {}
        steps = f"{len(finding['lrs'])} of {finding['steps']}" if finding else ""
        rows.append([f["label"], f"{f['lr']:.3g}", steps, finding.get("stop") or "no"])
        if finding:
            curves.append({"label": f["label"], "lrs": finding["lrs"], "smoothed": finding["smoothed"],
                           "suggestion": f["lr"]})  # fmt: skip
    blocks = [
        Block("h2", 'Learning rates found (lr = "find")'),
        Block(
            "p",
            'Before training, an lr range test ran once per configuration whose lr is "find" (configurations '
            "differing only in epochs or the lr schedule share one): training steps at a learning rate growing "
            "exponentially, the loss smoothed, stopped once it passed 4x its minimum. The lr found is where the "
            "smoothed loss falls fastest against log(lr), at most a tenth of the lr at its minimum; those grid points "
            "trained at it, and their identities "
            "hold it (a rerun reads the finding from the storage).",
        ),
        Block("table", rows=rows),
    ]
    _figure(blocks, "Smoothed training loss against the learning rate; dots: the rates found",
            figure_png(curves_figure(curves)) if curves else None)  # fmt: skip
    return blocks


# ------------------------------------------------------------------------------ searches
def _finished(search: SearchData) -> list[dict]:
    """The trials that count towards n_trials: complete or pruned, not skipped, by number."""
    return sorted(
        (t for t in search.trials if t["state"] in ("COMPLETE", "PRUNED") and not t["skipped"]),
        key=lambda t: t["number"],
    )


def _improves(value: float, best: float | None, metric: str) -> bool:
    from .config import higher_is_better

    return best is None or (value > best if higher_is_better(metric) else value < best)


def _search_style(data: StudyData, i: int, search: SearchData) -> dict:
    """A search's line: its regime's colour when its grid point names one; a line style per search."""
    regime = search.point.get("strategy")
    colour = _colour(regime) if regime is not None else OTHER_COLOURS[i % len(OTHER_COLOURS)]
    return {"color": colour, "linestyle": ("-", "--", ":", "-.")[i % 4], "marker": MARKERS[i % len(MARKERS)]}


def best_so_far_plot(data: StudyData, metric: str) -> bytes | None:
    """Per search, the best complete trial's metric so far against the trial number, and against the seconds its
    trials had taken when each finished (the clock `timeout` reads). Pruned trials move the line on, never up."""
    lines = []
    for i, search in enumerate(data.searches):
        by_number, best = [], None
        for t in _finished(search):
            if t["state"] == "COMPLETE" and _improves(t["value"], best, metric):
                best = t["value"]
            if best is not None:
                by_number.append((t["number"], best))
        by_time, best, clock = [], None, 0.0
        for t in sorted(
            (t for t in search.trials if t["completed"] and not t["skipped"]), key=lambda t: t["completed"]
        ):
            clock += t["seconds"] or 0.0
            if t["state"] == "COMPLETE" and _improves(t["value"], best, metric):
                best = t["value"]
            if best is not None and t["state"] in ("COMPLETE", "PRUNED"):
                by_time.append((clock, best))
        if by_number:
            lines.append((search, _search_style(data, i, search), by_number, by_time))
    if not lines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharey=True)
    for search, style, by_number, by_time in lines:
        for ax, points in zip(axes, (by_number, by_time)):
            ax.step([x for x, _ in points], [y for _, y in points], where="post", label=search.label, markersize=4,
                    **style)  # fmt: skip
    axes[0].set_xlabel("trial number (in its search)")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].set_xlabel("seconds of its trials (cumulative, each trial's wall time)")
    axes[0].set_ylabel(f"best {metric} so far")
    if metric != "val_loss":
        axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _describe(dimension) -> str:
    """A [search.space] entry in words."""
    if isinstance(dimension, list):
        return "one of " + ", ".join(map(str, dimension))
    text = f"{'log ' if dimension.get('log') else ''}range {dimension['low']} .. {dimension['high']}"
    return text + (f", step {dimension['step']}" if dimension.get("step") is not None else "")


def _value_text(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def search_blocks(data: StudyData) -> list[Block]:
    """The Search section: the searches' counts, best so far, the selected trial's parameters, importances and
    the pruned trials."""
    if not data.searches:
        return []
    settings = data.spec.get("search", {})
    space = {k.replace("-", "_"): v for k, v in settings.get("space", {}).items()}
    metric = data.spec.get("metric", "val_accuracy")
    pruner = settings.get("pruner", "median")
    ends = [f"{settings['n_trials']} finished trials" if settings.get("n_trials") else None,
            f"{_seconds(settings['timeout'])} s of trial time" if settings.get("timeout") else None]  # fmt: skip
    who = "Each grid point starts its own Optuna search" if data.spec.get("grid") else "The study is an Optuna search"
    text = (
        f"{who} (sampler {settings.get('sampler', 'tpe')}, seed "
        f"{settings.get('seed', 0)}), which ends at {' or '.join(e for e in ends if e)}; trials that differ only in "
        "the searched options share their grid point's settings. Searched: "
        + "; ".join(f"{k} ({_describe(v)})" for k, v in space.items())
        + ". "
        + (
            f"Pruner: {pruner}, consulted once {settings.get('startup_trials', 5)} trials of a search have completed "
            f"and never during a trial's first {settings.get('warmup_epochs', 1)} epoch(s); a pruned trial stops "
            "after the epoch it was judged at. "
            if pruner != "none"
            else "No pruner: every trial trains all its epochs. "
        )
        + f"The selected trial is the best complete trial of all searches by {metric}; pruned and diverged trials are "
        "counted but never selected."
    )
    rows = [["search", "complete", "pruned", "diverged", "failed (not counted)", "trial time", f"best {metric}"]]
    for search in data.searches:
        states = [t["state"] for t in search.trials if not t["skipped"]]
        stopped = [t["stopped"] for t in search.trials if not t["skipped"]]
        seconds = sum(t["seconds"] or 0.0 for t in search.trials if not t["skipped"])
        best = None
        for t in _finished(search):
            if t["state"] == "COMPLETE" and _improves(t["value"], best and best["value"], metric):
                best = t
        rows.append(
            [
                search.label,
                str(states.count("COMPLETE")),
                str(stopped.count("pruned")),
                str(stopped.count("diverged")),
                str(states.count("FAIL")),
                _duration(seconds),
                f"{_metric_value(best['value'], metric, _n_val(data.trials))} (trial {best['number']})"
                if best
                else "none complete",
            ]
        )
    blocks = [Block("h2", "Search"), Block("p", text), Block("table", rows=rows)]
    skipped = sum(1 for s in data.searches for t in s.trials if t["skipped"])
    if skipped:
        blocks.append(Block("p", f"{skipped} trials were claimed but not run (their search was full, or another "
                                 "worker was training the same parameters); they count nowhere."))  # fmt: skip
    _figure(blocks, f"Best {metric} so far per search, against the trial number and against its trials' time",
            best_so_far_plot(data, metric))  # fmt: skip
    blocks += _chosen_parameters(data, space)
    blocks += _importance_blocks(data)
    blocks += _pruned_blocks(data, metric)
    return blocks


def _chosen_parameters(data: StudyData, space: dict) -> list[Block]:
    t = data.test
    if not t:
        return []
    search = next((s for s in data.searches if (_selected_trial(data) or {}).get("search") == s.name), None)
    rows = [["option", "value", "from"]]
    for key, value in t["point"].items():
        rows.append([key, _value_text(value), f"searched: {_describe(space[key])}" if key in space else "grid point"])
    where = f" (search {search.label}, trial {t['trial']})" if search else ""
    return [Block("h3", "Selected trial's parameters"), Block("p", f"The selected trial{where}:"),
            Block("table", rows=rows)]  # fmt: skip


def _importance_blocks(data: StudyData) -> list[Block]:
    blocks = [
        Block("h3", "Parameter importances"),
        Block(
            "p",
            "Optuna's fANOVA importances (optuna.importance.get_param_importances, seeded): the share of the "
            "variance of the complete trials' objective each searched option explains, within its search; they "
            "describe these trials, not a law, and are rough with few trials.",
        ),
    ]
    found = [s for s in data.searches if s.importances]
    if found:
        params = list(dict.fromkeys(k for s in found for k in s.importances))
        rows = [["option", *(s.label for s in found)]]
        for key in params:
            rows.append([key, *(f"{s.importances[key]:.3f}" if key in s.importances else "-" for s in found)])
        blocks.append(Block("table", rows=rows))
    for s in data.searches:
        if not s.importances:
            blocks.append(Block("p", f"Search {s.label}: no importances: {s.no_importances}."))
        elif s.constant:
            blocks.append(Block("p", f"Search {s.label}: {', '.join(s.constant)} left out (the same in every "
                                     "complete trial)."))  # fmt: skip
    return blocks


def _pruned_blocks(data: StudyData, metric: str) -> list[Block]:
    blocks = [Block("h3", "Pruned trials")]
    stopped = [(s, t) for s in data.searches for t in s.trials if t["stopped"] and not t["skipped"]]
    if not stopped:
        return blocks + [Block("p", "No trial was pruned or diverged.")]
    rows = [["search", "pruned", "stopped after epoch (trials)", "diverged"]]
    for search in data.searches:
        mine = [t for s, t in stopped if s is search]
        epochs = defaultdict(int)
        for t in mine:
            if t["stopped"] == "pruned":
                epochs[t["stopped_at"]] += 1
        rows.append(
            [
                search.label,
                str(sum(t["stopped"] == "pruned" for t in mine)),
                ", ".join(f"{e} ({n})" for e, n in sorted(epochs.items())) or "-",
                str(sum(t["stopped"] == "diverged" for t in mine)),
            ]
        )
    detail = [["search", "trial", "parameters", "epochs trained", f"{metric} at its last epoch", "why"]]
    for search, t in stopped:
        last = t["history"][-1][metric] if t["history"] else None
        detail.append(
            [
                search.label,
                str(t["number"]),
                ", ".join(f"{k}={_value_text(v)}" for k, v in t["params"].items()),
                str(t["stopped_at"]),
                "" if last is None else _metric_value(last, metric, _n_val(data.trials)),
                t["reason"],
            ]
        )
    return blocks + [Block("table", rows=rows), Block("table", rows=detail)]


# ------------------------------------------------------------------------------ assembling
def _figure(blocks: list[Block], caption: str, png: bytes | None) -> None:
    if png:
        blocks.append(Block("figure", caption, png=png))


def build_blocks(data: StudyData) -> list[Block]:
    blocks = [Block("h2", f"Study {data.name}")]
    trained = len(_runs(data))
    shared = (
        f"{trained} runs trained; the others are epoch prefixes of a longer run with the same settings"
        if trained < len(data.trials)
        else "each trained separately"
    )
    if data.searches:
        blocks.append(
            Block(
                "p",
                f"{len(data.trials)} complete trials of {len(data.searches)} "
                f"search{'es' if len(data.searches) > 1 else ''} (the Search section: pruned trials, progress, "
                "importances). Accuracies are in percent, with no digit finer than their uncertainty allows.",
            )
        )
    else:
        blocks.append(
            Block(
                "p",
                f"{len(data.trials)} grid points ({shared}). "
                "Accuracies are in percent, with no digit finer than their uncertainty allows; the per-regime tables "
                "show each grid point's last epoch, as the study reported them.",
            )
        )
    if data.n_stale:
        blocks.append(
            Block(
                "p",
                f"{data.n_stale} trial{'s' * (data.n_stale != 1)} queued by an earlier spec (before its settings, data "
                "or weights changed) were found waiting and not run (marked stale in the storage).",
            )
        )
    if data.n_older:
        trials = "trial" if data.n_older == 1 else "trials"
        blocks.append(Block("p", f"The storage also holds {data.n_older} {trials} from earlier specs, not shown."))
    if data.trials:
        blocks += summary_blocks(data)
    if data.test:
        blocks += selection_blocks(data.test, data.n_test_evaluations)
    blocks += replicate_blocks(data)
    blocks += search_blocks(data)
    if "variant" in data.grid:
        blocks.append(Block("h2", "Variants: best validation accuracy per regime"))
        blocks.append(variant_table(data))
        base = _baseline(list(data.grid["variant"]))
        _figure(blocks, f"Each variant against {base}, per regime (sorted)", variant_chart(data))
    blocks += backbone_blocks(data)
    blocks += lr_found_blocks(data)
    blocks.append(Block("h2", "Results per regime"))
    if replicate_axes(data.grid):
        blocks.append(Block("p", f"Each cell is the mean ± sample std over its {_replicate_words(data)}."))
    if not data.searches:  # a search's trials differ in sampled values: the All trials table lists them
        blocks += paper_tables(data)
    _figure(blocks, "Learning curves per regime", learning_curves(data))
    _figure(blocks, "Validation accuracy vs epochs, per batch size", accuracy_vs_epochs(data))
    blocks.append(Block("h2", "Time"))
    blocks += study_time_blocks(data)
    table, times = time_table(data)
    blocks.append(
        Block(
            "p",
            "Per regime and setting: s/epoch is the training and validation seconds of every epoch its runs trained, "
            "divided by their number; setup is building the model and, for cached inputs, the frozen-feature pass "
            "(recorded by runs since this report version).",
        )
    )
    blocks.append(table)
    _figure(blocks, "Seconds per epoch by regime and setting (each trained epoch once)", timing_plot(data, times))
    blocks.append(Block("h2", "All trials"))
    blocks.append(trials_table(data))
    blocks += reproduce_blocks(data)
    return blocks


def render_markdown(blocks: list[Block], figure_dir: Path) -> str:
    out, n = [], 0
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out.append(("## " if b.kind == "h2" else "### ") + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "code":
            out.append("```\n" + b.text + "\n```")
        elif b.kind == "table":
            out.append(
                "\n".join(
                    ["| " + " | ".join(b.rows[0]) + " |", "|" + "---|" * len(b.rows[0])]
                    + ["| " + " | ".join(r) + " |" for r in b.rows[1:]]
                )
            )
        elif b.kind == "figure":
            n += 1
            name = f"figure{n}.png"
            atomic_write_bytes(b.png, figure_dir / name, "report figure")
            out.append(f"![{b.text}]({figure_dir.name}/{name})\n\n*{b.text}*")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}pre{background:#f5f5f5;padding:1em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}"
        "img{max-width:100%}</style></head><body>"
    ]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "code":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b.rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode()
            out.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b.text)}'>"
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


def write_report(directory: str | Path, storage: str | None = None, study_name: str | None = None) -> list[Path]:
    directory = Path(directory)
    data = load_study_data(directory, storage, study_name)
    blocks = build_blocks(data)
    figure_dir = directory / "report_files"
    figure_dir.mkdir(exist_ok=True)
    md, page = directory / "report.md", directory / "report.html"
    try:
        atomic_write_text(f"# transferlab report: {data.name}\n\n" + render_markdown(blocks, figure_dir), md, "report")
        atomic_write_text(render_html([Block("h2", f"transferlab report: {data.name}")] + blocks, data.name), page,
                          "report")  # fmt: skip
    except OutputError as error:
        raise StudyError(str(error)) from None
    return [md, page]
