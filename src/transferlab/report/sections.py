"""The report's sections as blocks: the summary and how sure the selection is, the selected trial with its error
analysis and calibration, time, backbones, learning rates found, searches."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..config.metrics import higher_is_better
from ..config.study import configuration_of, replicate_axes
from ..engine.lr_curve import curves_figure, figure_png
from ..scoring.stats import (
    MIN_REPLICATES,
    format_difference,
    interval_decimals,
    paired_difference,
    percent_with_interval,
    wilson_interval,
)
from ..study.records import Selection
from .data import Block, StudyData, _figure
from .figures import (
    accuracy_vs_cost,
    gallery_plot,
    gradcam_plot,
    normalised_confusion_plot,
    reliability_plot,
)
from .format import (
    WILSON_NOTE,
    _by_replicate,
    _duration,
    _like,
    _metric,
    _metric_value,
    _quote,
    _replicate_words,
    _runs,
    _seconds,
    _selected_trial,
    _selection_n_val,
    _setting,
    _share,
    _test_accuracy,
    configurations,
    key_text,
    point_key_text,
    tie_words,
)
from .reproduce import run_from
from .tables import (
    _archs,
    backbone_points,
    backbone_prose,
    backbone_table,
    class_counts_table,
    confused_pairs,
    interval_covers,
    summary_table,
)


def study_time_blocks(data: StudyData) -> list[Block]:
    """Wall time: the last `study run` as recorded, the trainings, the one-off work."""
    runs = _runs(data)
    training = sum(r["seconds"] for t in runs for r in t.history)
    epochs = sum(len(t.history) for t in runs)
    walls = sum(t.wall_seconds for t in runs)
    lines = [
        f"{len(runs)} runs trained {epochs} epochs in all: {_seconds(training)} s of training and validation "
        f"({_duration(training)}); their trials took {_seconds(walls)} s of wall time ({_duration(walls)}) including "
        "setup, checkpoints and bookkeeping. Epochs of derived trials are those of their run and are not counted again."
    ]
    last = data.record.last_run
    if last:
        lines.append(
            f"The last `study run` went from {last['started']} to {last['finished']}: {_duration(last['wall_seconds'])}"
            f" of wall time ({_seconds(last['wall_seconds'])} s), of which {_seconds(last['load_seconds'])} s loading "
            "the data in its own process. Trials trained by an earlier `study run` or by parallel workers make this "
            "differ from the trials' sum."
        )
    stopped = [t for s in data.searches for t in s.trials if t.stopped]
    if stopped:
        epochs = sum(len(t.history) for t in stopped)
        seconds = sum(r["seconds"] for t in stopped for r in t.history)
        lines.append(
            f"The searches' {len(stopped)} pruned or diverged trials trained {epochs} more epochs "
            f"({_seconds(seconds)} s), not counted above."
        )
    if data.test and data.test.test_seconds is not None:
        lines.append(f"The single test evaluation took {_seconds(data.test.test_seconds)} s.")
    return [Block("p", text) for text in lines]


def selection_blocks(t: Selection, n_evaluations: int) -> list[Block]:
    """The selected trial, and its test evaluation (or why there is none)."""
    n_val = _selection_n_val(t)
    rows = [
        ["", "value"],
        ["trial", f"{t.trial} ({key_text(t.key)})"],
        ["selection metric", t.metric + (f" ({tie_words(t)})" if tie_words(t) else "")],
        ["validation accuracy (best epoch)", _share(t.val_accuracy, n_val)],
        ["validation loss (best epoch)", f"{t.val_loss:.4f}"],
    ]
    if t.val_balanced_accuracy is not None:  # absent from selections recorded before these metrics
        rows.append(["validation balanced accuracy (best epoch)", _like(t.val_balanced_accuracy, t.val_accuracy,
                                                                        n_val)])  # fmt: skip
        rows.append(["validation macro-F1 (best epoch)", _like(t.val_macro_f1, t.val_accuracy, n_val)])
    if n_val:
        rows.append(["validation images", str(n_val)])
    blocks = [Block("h2", "Selected trial and test evaluation"), Block("table", rows=rows)]
    conf = t.configuration
    if conf:  # chosen by its mean over replicates; the row `trial` is the replicate whose checkpoint was tested
        mean = _metric_value(conf["mean"], t.metric, n_val)
        rows[1:1] = [
            ["configuration", key_text(conf["key"])],
            [f"mean {t.metric} over its {len(conf['trials'])} replicates", mean],
            ["its replicates (trials)", ", ".join(map(str, conf["trials"]))],
        ]
        rows[4][0] = f"trial tested (its replicate of best {t.metric})"
    counts = class_counts_table(t)
    if t.test_accuracy is None:
        rows.append(["test", "no test split (test_fraction = 0): not evaluated on a test set"])
        return blocks + counts
    n_test, accuracy = t.n_test, t.test_accuracy
    drop = min(interval_decimals(round(accuracy * n_test), n_test),
               interval_decimals(round(t.val_accuracy * n_val), n_val) if n_val else 1)  # fmt: skip
    rows += [
        ["test accuracy", _test_accuracy(t)],
        *([["test balanced accuracy", _like(t.test_balanced_accuracy, accuracy, n_test)]]
          if t.test_balanced_accuracy is not None else []),
        *([["test macro-F1", _like(t.test_macro_f1, accuracy, n_test)]] if t.test_macro_f1 is not None else []),
        ["test loss", f"{t.test_loss:.4f}"],
        ["drop from validation", f"{100 * (t.val_accuracy - accuracy):+.{drop}f} pp"],
        ["test images", str(n_test)],
        ["test evaluations recorded", str(n_evaluations)],
    ]  # fmt: skip
    per_class = [
        [c, str(sum(row)), percent_with_interval(row[i], sum(row)) if sum(row) else "-"]
        for i, (c, row) in enumerate(zip(t.per_class_accuracy, t.confusion_matrix))
    ]
    blocks.append(Block("table", rows=[["class", "test images", "test accuracy (95% CI)"], *per_class]))
    blocks += counts
    figures = SplitFigures.of_selection(t)
    blocks += error_analysis_blocks(figures) + calibration_blocks(figures)
    return blocks


@dataclass
class SplitFigures:
    """One split's figures as error_analysis_blocks and calibration_blocks show them: the study's selected trial on
    its test split (of_selection), or `transferlab analyze` on any split of any data (report/analysis.py)."""

    classes: list[str]
    confusion_matrix: list[list[int]]
    per_class: dict | None  # class -> precision, recall, f1, support
    errors: dict | None  # inference.analysis.error_analysis
    calibration: dict | None  # inference.analysis.analyze_split's
    accuracy: float
    n: int
    split: str = "test"  # "train", "val", "test" or "all" (every image of the data)
    model: str | None = None  # how the text names the model (None: the study's selected trial and its checkpoint)
    intervals: bool = False  # per-class precision and recall with their 95% intervals, not only at their precision

    @classmethod
    def of_selection(cls, t: Selection) -> SplitFigures:
        return cls(t.classes, t.confusion_matrix, t.per_class, t.errors, t.calibration, t.test_accuracy, t.n_test)

    def words(self) -> dict[str, str]:
        """How the text names the split and the model: "test split", "on the test split", "test images" ..."""
        every = self.split == "all"
        return {
            "title": "all images" if every else f"{self.split} split",
            "on": "all the images" if every else f"the {self.split} split",
            "images": "images" if every else f"{self.split} images",
            "image": "image" if every else f"{self.split} image",
            "trial": self.model or "the selected trial",
            "checkpoint": self.model or "the selected checkpoint",
        }


def error_analysis_blocks(t: SplitFigures) -> list[Block]:
    """One split (the selected trial's test split in a study): row-normalised confusion matrix, per-class precision /
    recall / F1, the most confused pairs, the most confident mistakes and Grad-CAM maps of a few."""
    w = t.words()
    blocks = [
        Block("h3", f"Error analysis ({w['title']})"),
        Block(
            "figure",
            f"Confusion matrix of {w['trial']} on {w['on']}, each row normalised to its true class "
            "(cells: % of the true class, then the count)",
            png=normalised_confusion_plot(t),
        ),
    ]
    if t.per_class:  # absent from selections recorded before
        ci = " (95% CI)" if t.intervals else ""  # "-" below: undefined (nothing predicted / no image)
        rows = [["class", w["images"], f"precision{ci}", f"recall{ci}", "F1"]]
        predicted = [sum(column) for column in zip(*t.confusion_matrix)]
        for i, (c, v) in enumerate(t.per_class.items()):
            hits = t.confusion_matrix[i][i]
            precision, recall = (
                (percent_with_interval(hits, predicted[i]) if predicted[i] else "-",
                 percent_with_interval(hits, v["support"]) if v["support"] else "-")
                if t.intervals
                else (_share(v["precision"], predicted[i], "-"), _share(v["recall"], v["support"], "-"))
            )  # fmt: skip
            rows.append([c, str(v["support"]), precision, recall,
                         _like(v["f1"], v["recall"] or 0.0, v["support"]) or "-"])  # fmt: skip
        blocks += [Block("p", f"Per-class precision, recall and F1 on {w['on']}:"), Block("table", rows=rows)]
    pairs = confused_pairs(t)
    if pairs:
        rows = [["true class", "predicted as", "images", "% of the true class"]]
        rows += [[a, b, str(n), _share(f, sum(t.confusion_matrix[t.classes.index(a)]), missing="-")]
                 for a, b, n, f in pairs]  # fmt: skip
        blocks += [Block("p", f"The {len(pairs)} most confused pairs (largest off-diagonal cells):")]
        blocks.append(Block("table", rows=rows))
    else:
        blocks.append(Block("p", f"No {w['image']} was misclassified."))
    errors = t.errors
    if errors and errors["mistakes"]:
        shown = len(errors["mistakes"])
        blocks.append(
            Block(
                "figure",
                f"The {shown} most confident mistakes of {errors['n_mistakes']} misclassified {w['images']} "
                "(confidence of the predicted class, before and after temperature scaling)",
                png=gallery_plot(errors, t.classes),
            )
        )
        if not any("gradcam" in m for m in errors["mistakes"]):  # skipped, and why (no conv layer, no grad-cam)
            why = errors["gradcam_layer"].removeprefix("none (").removesuffix(")")
            blocks.append(Block("p", f"No Grad-CAM maps: {why}."))
            return blocks
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
                png=gradcam_plot(errors, t.classes),
            )
        )
    return blocks


def _gradcam_layer_kind(layer: str) -> str:
    if layer.startswith("blocks.") and layer.endswith(".norm1"):
        return "the last transformer block's input norm, its patch tokens on the patch grid"
    return "the last convolution before the head"


def calibration_blocks(t: SplitFigures) -> list[Block]:
    """ECE and NLL on one split (the selected trial's test split in a study) before and after temperature scaling,
    and the reliability diagrams (absent from selections recorded before)."""
    c, w = t.calibration, t.words()
    if not c:
        return []
    low, high = c.get("temperature_range", (0.0, math.inf))
    at_bound = not low * 1.001 < c["temperature"] < high * 0.999
    fit = c.get("fit") or {}
    kept = fit and not fit.get("fitted")
    shown = "1 (not fitted)" if kept else f"{c['temperature']:.3g}" + (" (the search's bound)" if at_bound else "")
    accuracy = _share(t.accuracy, t.n)
    rows = [
        [w["title"], "before", "after temperature scaling"],
        ["temperature", "1", shown],
        [f"ECE ({c['reliability']['bins']} bins)", f"{c['ece']:.4f}", f"{c['ece_calibrated']:.4f}"],
        ["NLL", f"{c['nll']:.4f}", f"{c['nll_calibrated']:.4f}"],
        ["accuracy", accuracy, accuracy],
    ]
    how = (
        f"No temperature was fitted: {fit['reason']}; T stays 1 (no scaling), so the columns agree. "
        if kept
        else "The temperature T was fitted after training on the validation split (the NLL of softmax(logits / T) "
        f"of {w['checkpoint']}, minimised over T, where the validation images can support it: 50 or more, "
        "not all classified correctly, the minimum inside the search's range). "
    )
    text = how + (
        "predict uses it. It does not change which class is predicted, so accuracy is the same. Validation figures "
        f"recorded during training{', and the selection,' if t.model is None else ''} are those of the uncalibrated "
        "model. Expected calibration error: top-1 confidence in equal-width bins, the image-weighted mean of "
        "|accuracy - confidence|."
    )
    return [
        Block("h3", f"Calibration ({w['title']})"),
        Block("p", text),
        Block("table", rows=rows),
        Block(
            "figure",
            f"Reliability diagrams of {w['trial']} on {w['on']}, before and after temperature scaling "
            "(accuracy per confidence bin; the number above each bar is its image count)",
            png=reliability_plot(c),
        ),
    ]


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
        conf, n_val = t.configuration, _selection_n_val(t)
        if conf:
            text = (
                f"Selected by mean {t.metric} over replicates: configuration {conf['key']} "
                f"(mean {_metric_value(conf['mean'], t.metric, n_val)} over {len(conf['trials'])} replicates); "
                f"tested with the checkpoint of its replicate of best {t.metric}, trial {t.trial} ({key_text(t.key)}), "
                f"validation accuracy {_share(t.val_accuracy, n_val)}"
            )
        else:
            text = (
                f"Selected by {t.metric}: trial {t.trial} ({key_text(t.key)}), "
                f"validation accuracy {_share(t.val_accuracy, n_val)}"
            )
        if t.test_accuracy is not None:
            text += f"; test accuracy {_test_accuracy(t)} on {t.n_test} test images"
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


def small_test_note(t: Selection) -> str:
    return small_sample_note(t.test_accuracy, t.n_test, "test images")


def small_sample_note(accuracy: float, n: int, images: str) -> str:
    """A sentence (with a leading space) when the accuracy's 95% interval is wider than WIDE points; else ""."""
    low, high = wilson_interval(round(accuracy * n), n)
    half = 100 * max(accuracy - low, high - accuracy)
    if half <= WIDE:
        return ""
    return (
        f" With {n} {images} the interval reaches {half:.0f} points from the figure: too few to tell "
        "models a few points apart."
    )


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
    chosen = configuration_of(t.point, replicates)
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


def use_model_blocks(data: StudyData) -> list[Block]:
    """Where the selected checkpoint is and the commands that use it."""
    trial = _selected_trial(data)
    if trial is None or not trial.checkpoint or data.directory is None:
        return []
    found = (data.directory / trial.checkpoint).resolve()
    ckpt = trial.checkpoint  # relative to the study directory: a report shows no machine's own folders
    config = trial.config
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
            f"Checkpoint, in the study directory: {trial.checkpoint}{exists}. From the study directory "
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


def chance(t: Selection) -> float | None:
    """What always answering the test split's most common class scores (1 / classes when they are balanced)."""
    counts = (t.class_counts or {}).get("test")
    if counts and sum(counts.values()):
        return max(counts.values()) / sum(counts.values())
    return 1 / len(t.classes) if t.classes else None


def chance_warning(t: Selection | None) -> str:
    """A warning when the selected model's test accuracy interval reaches chance: it is not shown to beat guessing."""
    if not t or t.test_accuracy is None:
        return ""
    level = chance(t)
    low, _ = wilson_interval(round(t.test_accuracy * t.n_test), t.n_test)
    if level is None or low > level:
        return ""
    return (
        f"Warning: the test accuracy's 95% interval ({_test_accuracy(t)}) reaches down to chance, "
        f"{100 * level:.0f}% (always answering the most common class): on {t.n_test} test images this model is "
        "not shown to do better than guessing."
    )


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
