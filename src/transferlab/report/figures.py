"""The report's figures, each a PNG made from what the storage holds (matplotlib Figures, no pyplot state)."""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict

import matplotlib.colors
import matplotlib.lines
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from ..config.metrics import higher_is_better
from ..config.metrics import metric as metric_of
from ..config.study import REPLICATE_AXES
from ..data.decode import decode_png
from ..engine.lr_curve import figure_png as _png
from ..study.records import Selection
from .data import SearchData, StudyData
from .format import (
    OTHER_COLOURS,
    _baseline,
    _colour,
    _epochs_of,
    _final_row,
    _finished,
    _improves,
    _metric,
    _natural_setting,
    _regimes,
    _runs,
    _seconds,
    _setting,
    _value,
    _variant_means,
)
from .tables import BackbonePoint, pareto_front


# ------------------------------------------------------------------------------ figures
def _subplots(*grid, figsize: tuple[float, float], **options):
    """A figure and its axes (plt.subplots' signature), without pyplot's global figure state or backend."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **options)


def _shade(colour: str, i: int, n: int) -> tuple:
    """The i-th of n shades of a regime's colour, darkest first."""
    rgb = matplotlib.colors.to_rgb(colour)
    mix = 0.6 * i / max(n - 1, 1)
    return tuple(c + (1 - c) * mix for c in rgb)


MARKERS = "osD^vP*Xh"
NAMED = 5  # runs coloured and named per panel; the rest are thin grey lines (a legend of 20 reads as none)
GREY = "#b5b5b5"


def _rate_axis(ax) -> None:
    """Percent ticks on an axis of rates, cut at 0% and 100% (autoscaling's margin would reach past them)."""
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 1.0))


def _best_first(runs: list, data: StudyData) -> list:
    """Runs by the study's selection metric at their best epoch, best first (unrecorded last)."""
    metric = _metric(data)
    sign = -1 if higher_is_better(metric) else 1
    return sorted(runs, key=lambda t: (t.best.get(metric) is None, sign * (t.best.get(metric) or 0.0), t.number))


def _run_label(t, data: StudyData) -> str:
    """What tells a run apart in its regime's panel; a search's trial: its number and sampled values."""
    setting, number = _setting(t, data, skip=("strategy", "epochs")), f"trial {t.number}"
    if data.searches:  # a trial's sampled values, a few per line: the legend stays within its column
        return textwrap.fill(f"{number}: {setting}" if setting else number, 48, subsequent_indent="  ")
    return setting or number


def _draw_run(axes, col: int, t, losses: list[str], label: str | None = None, train: bool = True, **style) -> None:
    """A run's validation (solid) and training (dotted) accuracy and loss in column col."""
    epochs = [r["epoch"] for r in t.history]
    rows = (("accuracy", axes[0][col]), ("loss", axes[1 + losses.index(t.config.get("loss", "ce"))][col]))
    for metric, ax in rows:
        ax.plot(epochs, [r[f"val_{metric}"] for r in t.history], "-", label=label if metric == "accuracy" else None,
                **style)  # fmt: skip
        if train:
            ax.plot(epochs, [r[f"train_{metric}"] for r in t.history], ":", color=style["color"], alpha=0.8)


def learning_curves(data: StudyData) -> bytes | None:
    """One column per regime (its colour); rows: accuracy, then one loss row per loss kind (ce and mse differ in
    scale). One line per run actually trained: derived trials are prefixes of it. A regime's best NAMED runs by
    the selection metric are coloured and named, any others grey."""
    runs = _runs(data)
    if not runs or max(len(t.history) for t in runs) < 2:
        return None  # a single epoch is a dot, not a curve: the tables hold it
    strategies = _regimes(data)
    losses = sorted({t.config.get("loss", "ce") for t in runs})
    legend = 1.6 if data.searches else 0.0  # room below for a search's two-line legend entries
    fig, axes = _subplots(1 + len(losses), len(strategies), squeeze=False,
                          figsize=(4.2 * len(strategies), 2.8 * (1 + len(losses)) + legend))  # fmt: skip
    greyed = False
    for col, strategy in enumerate(strategies):
        mine = [t for t in runs if _value(t, "strategy") == strategy]
        if data.searches or len(mine) > NAMED:
            named = _best_first(mine, data)[:NAMED]
        else:  # a grid's few runs: in the order of their settings, the same shades in every column
            named = sorted(mine, key=lambda t: _natural_setting(t, data))
        others = [t for t in mine if all(t is not n for n in named)]
        for t in others:  # under the named runs, validation only
            _draw_run(axes, col, t, losses, train=False, color=GREY, linewidth=0.8, alpha=0.7)
        for i, t in enumerate(named):  # markers and transparency keep overlapping runs apart
            _draw_run(axes, col, t, losses, color=_shade(_colour(strategy), i, len(named)), marker=MARKERS[i],
                      markersize=4, alpha=0.85, label=_run_label(t, data))  # fmt: skip
        if others:
            greyed = True
            axes[0][col].plot([], [], color=GREY, label=f"{len(others)} other run{'s' * (len(others) > 1)}")
        axes[0][col].set_title(strategy, color=_colour(strategy), fontweight="bold")
        axes[0][col].set_ylabel("accuracy")
        _rate_axis(axes[0][col])
        for k, loss in enumerate(losses):
            axes[1 + k][col].set_ylabel(f"{loss} loss")
        axes[-1][col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if not ax.lines:  # this regime has no run of this loss kind
                ax.axis("off")
                ax.text(0.5, 0.5, f"no {ax.get_ylabel()} run", ha="center", va="center", transform=ax.transAxes)
        handles, labels = axes[0][col].get_legend_handles_labels()  # below the column, out of the data
        ncol = 1 if max(map(len, labels), default=0) > 30 else 2
        # its top a fixed distance below the axes, clear of the x label however much a long legend shrinks them
        axes[-1][col].legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), borderaxespad=5,
                             fontsize=7, ncol=ncol, frameon=False)  # fmt: skip
    best = f"\ncoloured: each regime's best {NAMED} runs by {_metric(data)}, best first; grey: the others"
    fig.suptitle("Learning curves per regime (solid: validation, dotted: train)" + (best if greyed else ""))
    fig.tight_layout()
    return _png(fig)


def accuracy_vs_epochs(data: StudyData) -> bytes | None:
    """Final validation accuracy against the epoch budget, per batch size; None when there is one budget only. With
    more than NAMED settings, the NAMED of best accuracy are coloured and named, the others grey."""
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
    best: dict[tuple, float] = defaultdict(float)  # (regime, setting) -> its best mean over panels and budgets
    for (_, strategy, name), by_epoch in series.items():
        best[(strategy, name)] = max(best[(strategy, name)], *(statistics.mean(v) for v in by_epoch.values()))
    named = set(sorted(best, key=lambda k: -best[k])[:NAMED]) if len(best) > NAMED + 1 else set(best)
    fig, axes = _subplots(1, len(batch_sizes), figsize=(4.2 * len(batch_sizes) + 1.5, 3.4), squeeze=False, sharey=True)
    for col, bs in enumerate(batch_sizes):
        ax = axes[0][col]
        for strategy in _regimes(data):
            for j, name in enumerate(names):
                by_epoch = series.get((bs, strategy, name))
                if not by_epoch:
                    continue
                xs = sorted(by_epoch)
                ys = [statistics.mean(by_epoch[x]) for x in xs]
                if (strategy, name) not in named:
                    ax.plot(xs, ys, color=GREY, linewidth=0.8, alpha=0.7, zorder=1)
                    continue
                label = strategy + (f" ({name})" if name else "")
                ax.plot(xs, ys, marker=MARKERS[j % len(MARKERS)], linestyle=("-", "--", ":", "-.")[j % 4],
                        color=_colour(strategy), alpha=0.85, label=label)  # fmt: skip
        ax.set_title(f"batch size {bs}")
        ax.set_xticks(epochs)
        ax.set_xlabel("epochs")
        ax.grid(alpha=0.3)
        _rate_axis(ax)
    axes[0][0].set_ylabel("validation accuracy (last epoch)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if len(best) > len(named):
        handles.append(matplotlib.lines.Line2D([], [], color=GREY))
        labels.append(f"{len(best) - len(named)} other settings")
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
    fig, ax = _subplots(figsize=(6.5, 1.2 + 0.32 * len(order)))
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
    fig, ax = _subplots(figsize=(6.5, 1.0 + 0.3 * len(keys)))
    ax.barh(range(len(keys)), [times[k]["per_epoch"] for k in keys], color=[_colour(k[0]) for k in keys])
    ax.set_yticks(range(len(keys)), [f"{k[0]}, {k[1]}" if k[1] else k[0] for k in keys], fontsize=8)
    for y, k in enumerate(keys):  # short bars stay readable
        ax.text(times[k]["per_epoch"], y, f" {_seconds(times[k]['per_epoch'])} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    ax.set_xlabel("seconds per epoch (training + validation)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


# ------------------------------------------------------------------------------ error analysis and calibration
def normalised_confusion_plot(t: Selection) -> bytes:
    """Rows normalised to their true class, with a colour scale; cells show the row's % and the count."""
    matrix, classes = t.confusion_matrix, t.classes
    rates = [[v / sum(row) if sum(row) else 0.0 for v in row] for row in matrix]
    k = len(classes)
    fig, ax = _subplots(figsize=(2 + 0.7 * k, 1.2 + 0.6 * k))
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


def gallery_plot(errors: dict, classes: list[str]) -> bytes:
    mistakes = errors["mistakes"]
    cols = min(len(mistakes), 4)
    rows = -(-len(mistakes) // cols)
    fig, axes = _subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes):
        ax.imshow(decode_png(m["thumbnail"]), interpolation="nearest")
        ax.set_title(
            f"true {classes[m['true']]}\npred {classes[m['predicted']]} {m['confidence']:.2f}"
            f" (cal. {m['confidence_calibrated']:.2f})",
            fontsize=7,
        )
    return _png(fig)


def gradcam_plot(errors: dict, classes: list[str]) -> bytes:
    mistakes = [m for m in errors["mistakes"] if "gradcam" in m]
    fig, axes = _subplots(2, len(mistakes), figsize=(2.3 * len(mistakes), 4.8), squeeze=False)
    for col, m in enumerate(mistakes):
        image, cam = decode_png(m["thumbnail"]), decode_png(m["gradcam"]) / 255
        axes[0][col].imshow(image, interpolation="nearest")
        axes[0][col].set_title(f"true {classes[m['true']]}\npred {classes[m['predicted']]}", fontsize=7)
        axes[1][col].imshow(image, interpolation="nearest")
        overlay = axes[1][col].imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        axes[1][col].set_title(f"Grad-CAM of {classes[m['predicted']]}", fontsize=7)
        if np.ptp(cam) < 0.02:  # a flat map is no finding: the panel says why it shows no place
            size = errors.get("gradcam_map_size") or ()
            why = (
                f"the layer's map is {'x'.join(map(str, size))}\nhere"
                if size and max(size) == 1
                else "no place\nstands out"
            )
            axes[1][col].text(
                0.5,
                0.5,
                f"uniform map:\n{why}",
                transform=axes[1][col].transAxes,
                ha="center",
                va="center",
                fontsize=7,
                color="white",
                bbox={"facecolor": "black", "alpha": 0.6},
            )
        for ax in axes[:, col]:
            ax.axis("off")
    fig.colorbar(overlay, ax=axes[1].tolist(), fraction=0.046, pad=0.04)
    return _png(fig)


def reliability_plot(calibration: dict) -> bytes:
    fig, axes = _subplots(1, 2, figsize=(9, 3.8), sharey=True)
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
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for x, a, c, n in full:  # counts above the bars, drawn past the top where a bar reaches it
            ax.text(x + width / 2, max(a, c) + 0.02, str(n), ha="center", fontsize=6, clip_on=False)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)  # an accuracy stops at 100%
        ax.set_xlabel("confidence (top-1)")
        ax.set_title(title, pad=14)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()  # beside the panels, never over a bar
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.06))
    return _png(fig)


LABEL_OFFSETS = (((5, 4), "left"), ((-5, 4), "right"), ((5, -10), "left"), ((-5, -10), "right"))


def accuracy_vs_cost(points: list[BackbonePoint]) -> bytes | None:
    """Best validation accuracy of each backbone x regime against GFLOPs/image and against s/epoch (log x axes):
    regime colours, a marker per backbone, each panel's Pareto front as a dashed step line."""
    points = [p for p in points if p.gflops]
    if len(points) < 2:
        return None
    archs = sorted({p.arch for p in points})
    regimes = list(dict.fromkeys(p.regime for p in points))
    fig, axes = _subplots(1, 2, figsize=(11, 4.6))
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
            if t.state == "COMPLETE" and _improves(t.value, best, metric):
                best = t.value
            if best is not None:
                by_number.append((t.number, best))
        by_time, best, clock = [], None, 0.0
        for t in sorted(
            (t for t in search.trials if t.datetime_complete and not t.skipped), key=lambda t: t.datetime_complete
        ):
            clock += t.seconds or 0.0
            if t.state == "COMPLETE" and _improves(t.value, best, metric):
                best = t.value
            if best is not None and t.state in ("COMPLETE", "PRUNED"):
                by_time.append((clock, best))
        if by_number:
            lines.append((search, _search_style(data, i, search), by_number, by_time))
    if not lines:
        return None
    fig, axes = _subplots(1, 2, figsize=(10.5, 3.8), sharey=True)
    for search, style, by_number, by_time in lines:
        for ax, points in zip(axes, (by_number, by_time)):
            ax.step([x for x, _ in points], [y for _, y in points], where="post", label=search.label, markersize=4,
                    **style)  # fmt: skip
    axes[0].set_xlabel("trial number (in its search)")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].set_xlabel("seconds of its trials (cumulative, each trial's wall time)")
    axes[0].set_ylabel(f"best {metric} so far")
    if metric_of(metric).rate:
        _rate_axis(axes[0])
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)
