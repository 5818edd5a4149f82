"""Selection and the single test evaluation: the best configuration of a study by its validation metric, and its
best replicate's checkpoint scored once on the test split, with the error analysis and calibration the report shows.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import optuna
import torch

from ..config.run import RunConfig
from ..config.study import StudySpec, configuration_of, point_key
from ..data.imageset import ImageSet
from ..data.sources import load_images
from ..data.split import class_counts, split_arrays, split_for
from ..engine.rundir import RunDir
from ..errors import StudyError
from ..inference.analysis import analyze_split
from ..inference.evaluate import align_labels
from ..inference.predict import load_checkpoint
from ..progress import log
from ..scoring.selection import Tie, best_group, best_trial
from ..scoring.stats import percent, percent_with_interval
from .plan import study_storage_size
from .records import Selection, StudyRecord, TrialRecord, grid_trials


def best_configuration(trials: list[TrialRecord], spec: StudySpec) -> tuple[TrialRecord, list, Tie | None]:
    """The configuration (a grid point without its replicate axes: seed, fold) of best mean metric over its
    replicates, and of those the trial of best metric, whose checkpoint is the one tested (scoring/selection.py breaks
    ties: validation loss, then fewer epochs, then the lower trial number). Returns (that trial, the configuration's
    trials, the tie the choice of configuration broke, or None). Without replicates: the best trial, alone."""
    if not spec.replicates:  # every trial its own configuration (a search's trials share their grid point)
        best, tie = best_trial(trials, spec.metric)
        return best, [best], tie

    def label(group: list) -> str:
        return point_key(configuration_of(group[0].point, spec.replicates))

    groups: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.number):
        groups.setdefault(label([t]), []).append(t)
    chosen, tie = best_group(list(groups.values()), spec.metric, label)
    return best_trial(chosen, spec.metric)[0], chosen, tie


def select_and_test(study: optuna.Study, spec: StudySpec, directory: Path, identities: set[str] | None = None,
                    candidates: list[TrialRecord] | None = None) -> Selection:  # fmt: skip
    """Best of the spec's trials (`identities`, default: those recorded in the study) by the study's metric; its
    checkpoint is evaluated once on the test split. `candidates`: the complete trials to choose from instead (the
    searches' complete trials; pruned ones never). With replicate axes (seed, fold) the best configuration by its
    mean (`best_configuration`) and, of its replicates, the best trial's checkpoint."""
    trials = grid_trials(study, identities) if candidates is None else candidates
    if candidates is None and len(trials) < len(spec.points()):
        raise StudyError(
            f"{len(spec.points()) - len(trials)} grid points are not complete; run the study again to finish them"
        )
    if not trials:
        raise StudyError("no search trial is complete (all pruned or diverged): nothing to select")
    best, replicates, tie = best_configuration(trials, spec)
    stored = StudyRecord.of(study)
    if stored.selection is not None and stored.selection.identity == best.identity:
        return stored.selection
    config = RunConfig.from_dict(best.config)
    images = load_images(config, study_storage_size(spec, config))
    split = RunDir(directory / best.run_dir).split() or split_for(images, config)
    counts = class_counts(images, split)
    selection = Selection(
        trial=best.number, key=best.key, identity=best.identity, point=best.point, metric=spec.metric,
        val_accuracy=best.best["val_accuracy"], val_loss=best.best["val_loss"],
        val_balanced_accuracy=best.best.get("val_balanced_accuracy"), val_macro_f1=best.best.get("val_macro_f1"),
        n_val=sum(counts["val"].values()), time=time.strftime("%Y-%m-%d %H:%M:%S"),
        tie=tie.to_dict() if tie else None,  # the choice was a tie on the metric, and what broke it
        class_counts=counts,
    )  # fmt: skip
    if spec.replicates:  # the configuration chosen by its mean; `trial` is its replicate whose checkpoint is tested
        selection.configuration = {
            "key": point_key(configuration_of(best.point, spec.replicates)),
            "replicate_axes": spec.replicates,
            "trials": [t.number for t in replicates],
            "mean": statistics.fmean(t.value for t in replicates),
        }
    n_val = selection.n_val
    if len(split.test) == 0 and not split.official_test:
        selection.test = None
        StudyRecord.write(study, selected=selection.to_dict())
        log(
            f"selected trial {best.number} ({best.key}): val accuracy "
            f"{percent(round(selection.val_accuracy * n_val), n_val)}; no test split (test_fraction = 0): the "
            "selected trial was not evaluated on a test set"
        )
        return selection
    test_x, test_y = split_arrays(images, split, "test")
    started = time.time()
    loaded = load_checkpoint(directory / best.checkpoint, config.device)
    test_y = torch.as_tensor(align_labels(loaded, ImageSet(test_x, test_y, images.classes, images.key)))
    analysis = analyze_split(loaded, test_x, test_y, loaded.view_logits(test_x))
    result, selection.calibration, selection.errors = analysis["scores"], analysis["calibration"], analysis["errors"]
    for name in ("balanced_accuracy", "macro_f1"):
        setattr(selection, f"test_{name}", result[name])
    selection.test_seconds = time.time() - started  # the evaluation with its error analysis (Grad-CAM included)
    selection.test_accuracy, selection.test_loss, selection.n_test = result["accuracy"], result["loss"], result["n"]
    selection.per_class_accuracy, selection.confusion_matrix = result["per_class_accuracy"], result["confusion_matrix"]
    selection.classes, selection.per_class = result["classes"], result["per_class"]
    # the thumbnails and Grad-CAM maps only in `selected`: the list of evaluations keeps the figures
    StudyRecord.write(study, test_evaluations=[*stored.test_evaluations, selection.to_dict(errors=False)],
                      selected=selection.to_dict())  # fmt: skip
    conf = selection.configuration
    chosen = (
        f"configuration {conf['key']} (best mean {spec.metric} over {len(replicates)} replicates), its best "
        f"replicate trial {best.number} ({best.key})"
        if conf
        else f"trial {best.number} ({best.key})"
    )
    n_test, correct = selection.n_test, round(selection.test_accuracy * selection.n_test)
    log(
        f"selected {chosen}: val accuracy {percent(round(selection.val_accuracy * n_val), n_val)}, test accuracy "
        f"{percent_with_interval(correct, n_test)} on {n_test} images (test split used once)"
    )
    return selection
