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
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

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
    trials = []
    identities = current_identities(study)
    for t in sorted(grid_trials(study, identities), key=lambda t: t.number):
        a = t.user_attrs
        trials.append(
            {
                "number": t.number,
                "kind": a["kind"],
                "key": a["key"],
                "point": a["point"],
                "history": a["history"],
                "best": a["best"],
                "wall_seconds": a.get("wall_seconds", 0.0),
                "config": a["config"],
                "input_path": a.get("input_path", ""),
                "run_dir": a.get("run_dir", ""),
            }
        )
    evaluations = study.user_attrs.get("test_evaluations", [])
    selected = study.user_attrs.get("selected", evaluations[-1] if evaluations else None)
    if selected and identities is not None and selected.get("identity") not in identities:
        selected = None  # selected under an earlier spec
    env = {}
    if trials:
        metrics = directory / trials[0]["run_dir"] / "metrics.json"
        if metrics.is_file():
            env = json.loads(metrics.read_text()).get("environment", {})
    spec_tree = dict(study.user_attrs.get("spec", {}))
    if "storage" in spec_tree:  # studies recorded before passwords were kept out of the storage
        spec_tree["storage"] = redact(str(spec_tree["storage"]))
    return StudyData(
        study.study_name,
        spec_tree,
        hide(study.user_attrs.get("command", ""), url),
        trials,
        spec.grid,
        selected,
        len(evaluations),
        env,
        older_trials(study, identities),
    )


# ------------------------------------------------------------------------------ tables
def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _cell(value: float | None) -> str:
    """A figure, or blank where a trial recorded before it existed has none."""
    return "" if value is None else f"{value:.4f}"


def _final_row(trial: dict) -> dict:
    """The figures a run of this many epochs reports: those of its last epoch (the paper's convention)."""
    return trial["history"][-1]


def _other_axes(data: StudyData) -> list[str]:
    return [a for a in data.grid if a not in PAPER_AXES and a != "seed"]


def _value(trial: dict, axis: str):
    return trial["point"].get(axis, trial["config"].get(axis))


def paper_tables(data: StudyData) -> list[Block]:
    """Per regime, per batch size (and per value of any other axis): columns = epochs, rows = metrics.

    Seeds of one grid point are aggregated as mean ± std.
    """
    blocks: list[Block] = []
    others = _other_axes(data)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for t in data.trials:
        groups[(_value(t, "strategy"), *(_value(t, a) for a in others), _value(t, "batch_size"))].append(t)
    for strategy in _ordered({k[0] for k in groups}, data.grid.get("strategy")):
        blocks.append(Block("h3", f"Regime: {strategy}"))
        for key in sorted((k for k in groups if k[0] == strategy), key=lambda k: tuple(map(_natural, k))):
            trials = groups[key]
            epochs = sorted({_value(t, "epochs") for t in trials})
            extra = ", ".join(f"{a} = {v}" for a, v in zip(others, key[1:-1]))
            caption = f"batch size {key[-1]}" + (f", {extra}" if extra else "")
            header = [caption] + [f"{e} epochs" for e in epochs]
            rows = [header]
            for label, metric in (
                ("val loss", "val_loss"),
                ("val accuracy", "val_accuracy"),
                ("train loss", "train_loss"),
                ("train accuracy", "train_accuracy"),
                ("gap (train - val accuracy)", None),
                ("seconds per epoch", "seconds"),
            ):
                row = [label]
                for e in epochs:
                    at = [t for t in trials if _value(t, "epochs") == e]
                    if metric is None:
                        vals = [_final_row(t)["train_accuracy"] - _final_row(t)["val_accuracy"] for t in at]
                    elif metric == "seconds":
                        vals = [statistics.mean(r["seconds"] for r in t["history"]) for t in at]
                    else:
                        vals = [_final_row(t)[metric] for t in at]
                    row.append(_fmt(vals, 2 if metric == "seconds" else 4))
                rows.append(row)
            blocks.append(Block("table", rows=rows))
    return blocks


def _natural(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _ordered(values: set, preferred: list | None) -> list:
    preferred = [v for v in (preferred or []) if v in values]
    return preferred + sorted(v for v in values if v not in preferred)


def variant_table(data: StudyData) -> Block:
    """Ablations: rows = variants (one change each), columns = regimes, cells = best validation accuracy."""
    strategies = _ordered({_value(t, "strategy") for t in data.trials}, data.grid.get("strategy"))
    rows = [["variant", *strategies]]
    for variant in data.grid["variant"]:
        row = [str(variant)]
        for strategy in strategies:
            vals = [
                t["best"]["val_accuracy"]
                for t in data.trials
                if _value(t, "variant") == variant and _value(t, "strategy") == strategy
            ]
            row.append(_fmt(vals))
        rows.append(row)
    return Block("table", rows=rows)


def trials_table(data: StudyData) -> Block:
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
        rows.append(
            [
                str(t["number"]),
                *(str(_value(t, a)) for a in axes),
                str(t["best"]["epoch"]),
                f"{t['best']['val_accuracy']:.4f}",
                _cell(t["best"].get("val_balanced_accuracy")),
                _cell(t["best"].get("val_macro_f1")),
                f"{h[-1]['val_accuracy']:.4f}",
                f"{h[-1]['train_accuracy']:.4f}",
                f"{statistics.mean(r['seconds'] for r in h):.2f}",
                f"{sum(r['seconds'] for r in h):.1f}",
                t["input_path"] + (" (shared run)" if t["kind"] == "derived" else ""),
            ]
        )
    return Block("table", rows=rows)


# ------------------------------------------------------------------------------ figures
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _longest_per_family(data: StudyData) -> list[dict]:
    """Learning curves: one line per run actually trained (derived trials are prefixes of it)."""
    return [t for t in data.trials if t["kind"] == "run"]


def _label(t: dict, skip=("strategy", "epochs")) -> str:
    return ", ".join(f"{a}={_value(t, a)}" for a in t["point"] if a not in skip) or "run"


def learning_curves(data: StudyData) -> bytes:
    strategies = _ordered({_value(t, "strategy") for t in data.trials}, data.grid.get("strategy"))
    fig, axes = plt.subplots(2, len(strategies), figsize=(4.6 * len(strategies), 7), squeeze=False)
    for col, strategy in enumerate(strategies):
        for t in (t for t in _longest_per_family(data) if _value(t, "strategy") == strategy):
            epochs = [r["epoch"] for r in t["history"]]
            for row, metric in enumerate(("accuracy", "loss")):
                (line,) = axes[row][col].plot(
                    epochs, [r[f"val_{metric}"] for r in t["history"]], label=f"{_label(t)} val"
                )
                axes[row][col].plot(
                    epochs,
                    [r[f"train_{metric}"] for r in t["history"]],
                    "--",
                    color=line.get_color(),
                    alpha=0.7,
                    label=f"{_label(t)} train",
                )
        axes[0][col].set_title(f"{strategy}")
        axes[0][col].set_ylabel("accuracy")
        axes[1][col].set_ylabel("loss")
        axes[1][col].set_xlabel("epoch")
        axes[0][col].legend(fontsize=7)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle("Learning curves (solid: validation, dashed: train)")
    return _png(fig)


def accuracy_vs_epochs(data: StudyData) -> bytes:
    batch_sizes = sorted({_value(t, "batch_size") for t in data.trials})
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 * len(batch_sizes), 3.8), squeeze=False, sharey=True)
    for col, bs in enumerate(batch_sizes):
        ax = axes[0][col]
        lines: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for t in (t for t in data.trials if _value(t, "batch_size") == bs):
            lines[_label(t, skip=("batch_size", "epochs", "seed"))][_value(t, "epochs")].append(
                _final_row(t)["val_accuracy"]
            )
        for name, by_epoch in sorted(lines.items()):
            xs = sorted(by_epoch)
            ax.plot(xs, [statistics.mean(by_epoch[x]) for x in xs], "o-", label=name)
        ax.set_title(f"batch size {bs}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epochs")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def timing_plot(data: StudyData) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    groups: dict[tuple, list[float]] = defaultdict(list)
    for t in data.trials:
        groups[(_value(t, "strategy"), _value(t, "batch_size"))] += [r["seconds"] for r in t["history"]]
    strategies = _ordered({k[0] for k in groups}, data.grid.get("strategy"))
    batch_sizes = sorted({k[1] for k in groups})
    width = 0.8 / max(len(batch_sizes), 1)
    for i, bs in enumerate(batch_sizes):
        ax.bar(
            [s + i * width for s in range(len(strategies))],
            [statistics.mean(groups[(st, bs)]) if groups[(st, bs)] else 0 for st in strategies],
            width,
            label=f"batch {bs}",
        )
    ax.set_xticks([s + width * (len(batch_sizes) - 1) / 2 for s in range(len(strategies))], strategies)
    ax.set_ylabel("seconds per epoch")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
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


def selection_blocks(t: dict, n_evaluations: int) -> list[Block]:
    """The selected trial, and its test evaluation (or why there is none)."""
    rows = [
        ["", "value"],
        ["trial", f"{t['trial']} ({t['key']})"],
        ["selection metric", t["metric"]],
        ["validation accuracy (best epoch)", f"{t['val_accuracy']:.4f}"],
        ["validation loss (best epoch)", f"{t['val_loss']:.4f}"],
    ]
    if t.get("val_balanced_accuracy") is not None:  # absent from selections recorded before these metrics
        rows.append(["validation balanced accuracy (best epoch)", _cell(t["val_balanced_accuracy"])])
        rows.append(["validation macro-F1 (best epoch)", _cell(t["val_macro_f1"])])
    blocks = [Block("h2", "Selected trial and test evaluation"), Block("table", rows=rows)]
    counts = class_counts_table(t)
    if t.get("test_accuracy") is None:
        rows.append(["test", "no test split (test_fraction = 0): not evaluated on a test set"])
        return blocks + counts
    rows += [
        ["test accuracy", f"{t['test_accuracy']:.4f}"],
        *([["test balanced accuracy", _cell(t["test_balanced_accuracy"])]] if "test_balanced_accuracy" in t else []),
        *([["test macro-F1", _cell(t["test_macro_f1"])]] if "test_macro_f1" in t else []),
        ["test loss", f"{t['test_loss']:.4f}"],
        ["drop from validation", f"{t['val_accuracy'] - t['test_accuracy']:+.4f}"],
        ["test images", str(t["n_test"])],
        ["test evaluations recorded", str(n_evaluations)],
    ]
    per_class = [
        [c, str(sum(row)), _cell(v)] for (c, v), row in zip(t["per_class_accuracy"].items(), t["confusion_matrix"])
    ]
    blocks.append(Block("table", rows=[["class", "test images", "test accuracy"], *per_class]))
    blocks += counts
    blocks += error_analysis_blocks(t) + calibration_blocks(t)
    return blocks


# ------------------------------------------------------------------------------ error analysis and calibration
def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


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
        for c, v in t["per_class"].items():
            figures = [f"{v[k]:.4f}" if v[k] is not None else "-" for k in ("precision", "recall", "f1")]
            rows.append([c, str(v["support"]), *figures])
        blocks += [Block("p", "Per-class precision, recall and F1 on the test split:"), Block("table", rows=rows)]
    pairs = confused_pairs(t)
    if pairs:
        rows = [["true class", "predicted as", "images", "% of the true class"]]
        rows += [[a, b, str(n), _percent(f)] for a, b, n, f in pairs]
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
                f"Grad-CAM of the predicted class on the first mistakes (layer {errors['gradcam_layer']}, the last "
                f"convolution before the head{note})",
                png=gradcam_plot(errors, t["classes"]),
            )
        )
    return blocks


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
    rows = [
        ["test split", "before", "after temperature scaling"],
        ["temperature", "1", f"{c['temperature']:.4f}" + (" (the search's bound)" if at_bound else "")],
        [f"ECE ({c['reliability']['bins']} bins)", f"{c['ece']:.4f}", f"{c['ece_calibrated']:.4f}"],
        ["NLL", f"{c['nll']:.4f}", f"{c['nll_calibrated']:.4f}"],
        ["accuracy", f"{t['test_accuracy']:.4f}", f"{t['test_accuracy']:.4f}"],
    ]
    text = (
        "The temperature T was fitted after training on the validation split (the NLL of softmax(logits / T) of "
        "the selected checkpoint, minimised over T); predict uses it. It does not change which class is predicted, "
        "so accuracy is the same. Validation figures recorded during training, and the selection, are those of "
        "the uncalibrated model. Expected calibration error: top-1 confidence in equal-width bins, the "
        "image-weighted mean of |accuracy - confidence|."
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


# ------------------------------------------------------------------------------ assembling
def build_blocks(data: StudyData) -> list[Block]:
    blocks = [Block("h2", f"Study {data.name}")]
    trained = sum(t["kind"] == "run" for t in data.trials)
    shared = (
        f"{trained} runs trained; the others are epoch prefixes of a longer run with the same settings"
        if trained < len(data.trials)
        else "each trained separately"
    )
    blocks.append(
        Block(
            "p",
            f"{len(data.trials)} grid points ({shared}). "
            "Tables show each grid point's last epoch, as the study reported them.",
        )
    )
    if data.n_older:
        trials = "trial" if data.n_older == 1 else "trials"
        blocks.append(Block("p", f"The storage also holds {data.n_older} {trials} from earlier specs, not shown."))
    if data.test:
        blocks += selection_blocks(data.test, data.n_test_evaluations)
    if "variant" in data.grid:
        blocks.append(Block("h2", "Variants: best validation accuracy per regime"))
        blocks.append(variant_table(data))
    blocks.append(Block("h2", "Results per regime"))
    blocks += paper_tables(data)
    blocks.append(Block("figure", "Learning curves per regime", png=learning_curves(data)))
    blocks.append(Block("figure", "Validation accuracy vs epochs, per batch size", png=accuracy_vs_epochs(data)))
    blocks.append(Block("h2", "Time"))
    blocks.append(Block("figure", "Seconds per epoch by regime and batch size", png=timing_plot(data)))
    blocks.append(Block("h2", "All trials"))
    blocks.append(trials_table(data))
    blocks.append(Block("h2", "Reproduce"))
    blocks.append(Block("code", data.command or "(command not recorded)"))
    blocks.append(Block("code", json.dumps(data.spec, indent=1)))
    if data.environment:
        blocks.append(Block("table", rows=[["environment", ""]] + [[k, str(v)] for k, v in data.environment.items()]))
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
            (figure_dir / name).write_bytes(b.png)
            out.append(f"![{b.text}]({figure_dir.name}/{name})\n\n*{b.text}*")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}pre{background:#f5f5f5;padding:1em;overflow:auto}"
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
    md.write_text(f"# transferlab report: {data.name}\n\n" + render_markdown(blocks, figure_dir))
    page.write_text(render_html([Block("h2", f"transferlab report: {data.name}")] + blocks, data.name))
    return [md, page]
