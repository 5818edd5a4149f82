"""The report's tables: the summary, the paper's per-regime tables, variants, configurations and paired
differences, time, all trials, backbones against their cost."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from ..config.metrics import higher_is_better
from ..config.study import configuration_of, point_key, replicate_axes
from ..scoring.stats import (
    MIN_REPLICATES,
    difference_verdict,
    format_difference,
    paired_difference,
)
from ..study.records import Selection, TrialRecord
from .data import Block, StudyData
from .format import (
    _best_epoch,
    _by_replicate,
    _configuration_axes,
    _difference_metric,
    _epochs_of,
    _final_row,
    _fmt,
    _like,
    _mean_std,
    _metric,
    _n_train,
    _n_val,
    _name,
    _natural,
    _natural_setting,
    _other_axes,
    _points,
    _rate,
    _ratio,
    _regimes,
    _replicate_words,
    _runs,
    _searched,
    _seconds,
    _selected_trial,
    _setting,
    _share,
    _shares,
    _test_accuracy,
    _value,
    _value_text,
    configurations,
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
            # by the shown text, then the values: settings that round to one text stay apart
            by_setting: dict[tuple, list[float]] = defaultdict(list)
            for t in data.trials:
                if _value(t, "strategy") == regime and _value(t, "epochs") == e:
                    by_setting[(_setting(t, data), _natural_setting(t, data))].append(t.best["val_accuracy"])
            if by_setting:
                setting = max(sorted(by_setting), key=lambda k: statistics.mean(by_setting[k]))
                cells[(regime, e)] = (statistics.mean(by_setting[setting]), setting[0], by_setting[setting])
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


def variant_table(data: StudyData) -> Block:
    """Ablations: rows = variants (one change each), columns = regimes, cells = best validation accuracy (%)."""
    strategies = _regimes(data)
    rows = [["variant", *strategies]]
    for variant in data.grid["variant"]:
        row = [str(variant)]
        for strategy in strategies:
            vals = [
                t.best["val_accuracy"]
                for t in data.trials
                if _value(t, "variant") == variant and _value(t, "strategy") == strategy
            ]
            several = replicate_axes(data.grid) and len(vals) > 1
            row.append(_shares(vals, _n_val(data.trials)) + (f", n = {len(vals)}" if several else ""))
        rows.append(row)
    return Block("table", rows=rows)


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
        h = t.history
        derived = t.kind == "derived"
        source = f"in run {t.source_trial}" if t.source_trial is not None else "in its run"
        rows.append(
            [
                str(t.number),
                *(_value_text(_value(t, a)) for a in axes),
                _best_epoch(t),
                _share(t.best["val_accuracy"], t.n_val),
                _like(t.best.get("val_balanced_accuracy"), t.best["val_accuracy"], t.n_val),
                _like(t.best.get("val_macro_f1"), t.best["val_accuracy"], t.n_val),
                _share(h[-1]["val_accuracy"], t.n_val),
                _share(h[-1]["train_accuracy"], t.n_train),
                source if derived else f"{statistics.mean(r['seconds'] for r in h):.2f}",
                source if derived else f"{sum(r['seconds'] for r in h):.1f}",
                t.input_path + (" (shared run)" if derived else ""),
            ]
        )
    return Block("table", rows=rows)


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
    chosen = configuration_of(data.test.point, replicate_axes(data.grid)) if data.test else None
    columns = ["val_accuracy"] + ([metric] if metric != "val_accuracy" else [])
    rows = [[*axes, "n", *(f"{c.replace('_', ' ')} (best epoch, mean ± std)" for c in columns), "selected"]]
    found = configurations(data)
    found.sort(key=lambda c: -sign * statistics.fmean(t.best[metric] for t in c[1]))
    for config, trials in found:
        cells = [_mean_std([t.best[c] for t in trials], c, _n_val(trials)) for c in columns]
        mark = "selected" if config == chosen else ""
        rows.append([*(_value_text(config.get(a, "")) for a in axes), str(len(trials)), *cells, mark])
    return Block("table", rows=rows)


def paired_rows(data: StudyData) -> list[list[str]]:
    """Every two configurations that differ in one grid axis only, paired on their shared replicates: the later
    value of the axis (grid order) minus the earlier, in points of `_difference_metric`, and the verdict."""
    metric, axes, replicates = _difference_metric(data), _configuration_axes(data), replicate_axes(data.grid)
    found = configurations(data)

    def by_replicate(trials: list[TrialRecord]) -> dict[tuple, float | None]:
        return _by_replicate(trials, metric, replicates)

    rows = []
    for axis in axes:
        order = {point_key({axis: v}): i for i, v in enumerate(data.grid[axis])}
        rest: dict[str, list[tuple[dict, list[dict]]]] = defaultdict(list)
        for config, trials in found:
            others = {k: v for k, v in config.items() if k != axis}
            rest[point_key(others)].append((config, trials))
        for group in rest.values():
            group.sort(key=lambda c: order.get(point_key({axis: c[0].get(axis)}), len(order)))
            for i, (first, first_trials) in enumerate(group):
                for second, second_trials in group[i + 1 :]:
                    a, b = by_replicate(second_trials), by_replicate(first_trials)
                    shared = sorted(set(a) & set(b))
                    if not shared or any(v is None for v in (*a.values(), *b.values())):
                        continue
                    d = paired_difference([a[k] for k in shared], [b[k] for k in shared])
                    name_a, name_b = _name(axis, second.get(axis)), _name(axis, first.get(axis))
                    held = ", ".join(f"{k} = {_value_text(v)}" for k, v in first.items() if k != axis) or "-"
                    difference = f"{_value_text(second.get(axis))} - {_value_text(first.get(axis))}"
                    rows.append([axis, held, difference, str(d.n), format_difference(d),
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
        epochs = sum(len(t.history) for t in runs)
        training = sum(r["seconds"] for t in runs for r in t.history)
        setups = [t.setup_seconds for t in runs if t.setup_seconds is not None]
        features = [t.feature_seconds for t in runs if t.feature_seconds is not None]
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


def class_counts_table(t: Selection) -> list[Block]:
    """Images per class in each split of the selected trial's data (none for selections recorded before)."""
    counts = t.class_counts
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


def confused_pairs(t: Selection, top: int = 5) -> list[tuple[str, str, int, float]]:
    """The `top` largest off-diagonal cells of the confusion matrix: (true, predicted, count, fraction of the true
    class), largest count first (ties: matrix order)."""
    matrix, classes = t.confusion_matrix, t.classes
    cells = [
        (classes[i], classes[j], v, v / sum(row))
        for i, row in enumerate(matrix)
        for j, v in enumerate(row)
        if i != j and v > 0
    ]
    return sorted(cells, key=lambda c: -c[2])[:top]


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
    trial: TrialRecord
    cost: dict | None
    values: list[float] = field(default_factory=list)  # with replicates: its configuration's, one per replicate

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.values) if self.values else self.trial.best["val_accuracy"]

    @property
    def gflops(self) -> float | None:
        return self.cost["flops"] / 1e9 if self.cost else None

    @property
    def seconds_per_epoch(self) -> float:
        history = self.trial.history
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
                values = max(mine, key=lambda ts: (statistics.fmean(t.best["val_accuracy"] for t in ts),
                                                   -ts[0].number))  # fmt: skip
                best = max(values, key=lambda t: (t.best["val_accuracy"], -t.number))
                out.append(BackbonePoint(arch, regime, best, best.cost, [t.best["val_accuracy"] for t in values]))
    return out


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
        if chosen is not None and selected.test_accuracy is not None:
            if (str(_value(chosen, "arch")), _value(chosen, "strategy")) == (p.arch, p.regime):
                test = f"{_test_accuracy(selected)} (trial {selected.trial})"
        rows.append(
            [
                p.arch,
                p.regime,
                str(p.trial.number),
                str(c["resolution"] if c else _value(p.trial, "resolution")),
                f"{c['params']:,}" if c else "not recorded",
                f"{c['trainable_params']:,}" if c else "not recorded",
                f"{p.gflops:.4g}" if c else "not recorded",
                _rate(c.get("train_images_per_second") if c else None),
                _rate(c.get("inference_images_per_second") if c else None),
                f"{p.seconds_per_epoch:.3g}" if p.seconds_per_epoch < 10 else _seconds(p.seconds_per_epoch),
                _shares(p.values or [p.accuracy], p.trial.n_val),
                test,
            ]
        )
    return Block("table", rows=rows)


def backbone_prose(points: list[BackbonePoint]) -> str:
    """What the table shows, in words: the most accurate point and the cheaper points on the FLOPs front."""
    best = max(points, key=lambda p: (p.accuracy, -p.trial.number))
    text = (
        f"On this study's data, {best.arch} in regime {best.regime} is the most accurate "
        f"({_shares(best.values or [best.accuracy], best.trial.n_val)} best validation accuracy"
        + (f", {best.gflops:.4g} GFLOPs/image)." if best.gflops is not None else ").")
    )
    costed = [p for p in points if p.gflops]
    if best.gflops:
        front = pareto_front([(p.gflops, p.accuracy, i) for i, p in enumerate(costed)])
        cheaper = [costed[i] for _, _, i in front if costed[i].gflops < best.gflops]
        for p in cheaper:
            fewer = _ratio(best.gflops / p.gflops)
            less = _points([best.accuracy - p.accuracy], p.trial.n_val, [p.accuracy])
            text += (
                f" {p.arch} in regime {p.regime} is on the accuracy-vs-FLOPs front at {fewer}x fewer FLOPs "
                f"({_shares(p.values or [p.accuracy], p.trial.n_val)}, {less.lstrip('+')} less)."
            )
    return text
