"""The report's section on a study's searches: how each went, what it chose, which options mattered, what was
pruned."""

from __future__ import annotations

from collections import defaultdict

from ..config.metrics import DEFAULT_METRIC
from .data import Block, StudyData, _figure
from .figures import (
    best_so_far_plot,
)
from .format import (
    _describe,
    _duration,
    _finished,
    _improves,
    _metric_value,
    _n_val,
    _seconds,
    _selected_trial,
    _value_text,
)


def search_blocks(data: StudyData) -> list[Block]:
    """The Search section: the searches' counts, best so far, the selected trial's parameters, importances and
    the pruned trials."""
    if not data.searches:
        return []
    settings = data.spec.get("search", {})
    space = {k.replace("-", "_"): v for k, v in settings.get("space", {}).items()}
    metric = data.spec.get("metric", DEFAULT_METRIC)
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
        states = [t.state for t in search.trials if not t.skipped]
        stopped = [t.stopped for t in search.trials if not t.skipped]
        seconds = sum(t.seconds or 0.0 for t in search.trials if not t.skipped)
        best = None
        for t in _finished(search):
            if t.state == "COMPLETE" and _improves(t.value, best and best.value, metric):
                best = t
        rows.append(
            [
                search.label,
                str(states.count("COMPLETE")),
                str(stopped.count("pruned")),
                str(stopped.count("diverged")),
                str(states.count("FAIL")),
                _duration(seconds),
                f"{_metric_value(best.value, metric, _n_val(data.trials))} (trial {best.number})"
                if best
                else "none complete",
            ]
        )
    blocks = [Block("h2", "Search"), Block("p", text), Block("table", rows=rows)]
    skipped = sum(1 for s in data.searches for t in s.trials if t.skipped)
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
    search = next((s for s in data.searches if getattr(_selected_trial(data), "search", None) == s.name), None)
    rows = [["option", "value", "from"]]
    for key, value in t.point.items():
        rows.append([key, _value_text(value), f"searched: {_describe(space[key])}" if key in space else "grid point"])
    where = f" (search {search.label}, trial {t.trial})" if search else ""
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
    stopped = [(s, t) for s in data.searches for t in s.trials if t.stopped and not t.skipped]
    if not stopped:
        return blocks + [Block("p", "No trial was pruned or diverged.")]
    rows = [["search", "pruned", "stopped after epoch (trials)", "diverged"]]
    for search in data.searches:
        mine = [t for s, t in stopped if s is search]
        epochs = defaultdict(int)
        for t in mine:
            if t.stopped == "pruned":
                epochs[t.stopped_at] += 1
        rows.append(
            [
                search.label,
                str(sum(t.stopped == "pruned" for t in mine)),
                ", ".join(f"{e} ({n})" for e, n in sorted(epochs.items())) or "-",
                str(sum(t.stopped == "diverged" for t in mine)),
            ]
        )
    detail = [["search", "trial", "parameters", "epochs trained", f"{metric} at its last epoch", "why"]]
    for search, t in stopped:
        last = t.history[-1][metric] if t.history else None
        detail.append(
            [
                search.label,
                str(t.number),
                ", ".join(f"{k}={_value_text(v)}" for k, v in t.params.items()),
                str(t.stopped_at),
                "" if last is None else _metric_value(last, metric, _n_val(data.trials)),
                t.reason,
            ]
        )
    return blocks + [Block("table", rows=rows), Block("table", rows=detail)]
