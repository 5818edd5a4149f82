"""Imbalanced classes: counts, class weights, a balanced sampler, balanced accuracy and macro-F1.

The specification, as tests on an imbalanced synthetic tree (red 30, green 10, blue 4 PNGs of 16 px):
  * metrics.json records the images per class of every split (train / val / test), equal to split.json's;
  * `class_weights = "balanced"` weights the training loss by n / (classes x training count of the class)
    (sklearn's compute_class_weight("balanced")), for ce and mse alike; it changes the training, and a run
    stays deterministic; validation loss stays the plain criterion;
  * `sampler = "balanced"` draws len(train) training images per epoch, with replacement, each with probability
    proportional to 1 / its class's count: every class about equally often; deterministic given the seed;
  * both options resume: a run killed after epoch 1 and run again has the uninterrupted run's history;
  * scores() (validation, `evaluate`, the study's test) reports balanced accuracy (mean recall over classes present
    in the labels) and macro-F1 (over classes present in labels or predictions), equal to sklearn's; every epoch
    records them for validation and training;
  * a study's `metric` may be val_balanced_accuracy or val_macro_f1 (higher is better): it picks each trial's best
    epoch and value and the selected trial; the report shows the selected trial's class x split counts;
  * at their defaults the new options are left out of run and trial identities (earlier runs still resume, earlier
    trials are reused);
  * bad values (`--class-weights foo`, `--sampler x`, both options balanced at once, `metric = "val_f1"`) are one
    line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from helpers import (
    assert_one_line_error,
    history_without_time,
    load_study,
    make_image_tree,
    quiet,
    tiny_config,
    train_args,
    trained_run,
    write_spec,
)
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from transferlab import load_images, train
from transferlab.cli import main
from transferlab.config.identity import identity
from transferlab.engine import loop
from transferlab.engine.run import loss_function
from transferlab.engine.train import run_training
from transferlab.scoring.metrics import scores
from transferlab.study.runner import run_study

SIZES = {"red": 30, "green": 10, "blue": 4}


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced") / "images"
    for seed, (name, n) in enumerate(SIZES.items()):
        make_image_tree(root, classes=(name,), per_class=n, size=16, seed=seed)
    return root


def config_for(tree: Path, cache: Path, **overrides):
    return tiny_config(tree, cache, head="linear", lr=1e-2, **overrides)


def labels_of(config) -> tuple[np.ndarray, list[str]]:
    images = load_images(config)
    return images.labels, images.classes


# ---------------------------------------------------------------------------- counts
def test_counts_of_every_split_are_recorded_and_equal_split_json(imbalanced, tmp_path):
    config = config_for(imbalanced, tmp_path / "cache")
    result = train(config, tmp_path / "run", log=quiet)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    split = json.loads((result.out_dir / "split.json").read_text())
    labels, classes = labels_of(config)
    for name in ("train", "val", "test"):
        expected = {c: int((labels[split[name]] == i).sum()) for i, c in enumerate(classes)}
        assert metrics["class_counts"][name] == expected
    assert sum(sum(c.values()) for c in metrics["class_counts"].values()) == sum(SIZES.values())
    assert metrics["class_counts"]["train"]["red"] > 3 * metrics["class_counts"]["train"]["blue"] > 0
    assert metrics["class_weights"] is None


# ---------------------------------------------------------------------------- class weights
def test_balanced_class_weights_follow_sklearns_formula(imbalanced, tmp_path):
    config = config_for(imbalanced, tmp_path / "cache", class_weights="balanced")
    result = train(config, tmp_path / "run", log=quiet)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    labels, classes = labels_of(config)
    train_labels = labels[json.loads((result.out_dir / "split.json").read_text())["train"]]
    expected = compute_class_weight("balanced", classes=np.arange(len(classes)), y=train_labels)
    assert list(metrics["class_weights"]) == classes
    np.testing.assert_allclose(list(metrics["class_weights"].values()), expected, rtol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_class_weights_change_the_training_and_are_deterministic(imbalanced, tmp_path, loss):
    plain = train(config_for(imbalanced, tmp_path / "cache", loss=loss, epochs=2), tmp_path / "plain", log=quiet)
    config = config_for(imbalanced, tmp_path / "cache", loss=loss, epochs=2, class_weights="balanced")
    weighted = train(config, tmp_path / "weighted", log=quiet)
    again = train(config, tmp_path / "again", log=quiet)
    assert history_without_time(weighted.history) == history_without_time(again.history)
    assert weighted.history[0]["train_loss"] != plain.history[0]["train_loss"]
    assert weighted.history[-1]["val_loss"] != plain.history[-1]["val_loss"]


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_weighted_loss_is_the_class_weighted_mean_of_the_rows(loss):
    config = config_for("unused", "unused", loss=loss)
    generator = torch.Generator().manual_seed(0)
    logits, y = torch.randn(12, 3, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    plain = loss_function(config, 3)(logits, y)
    torch.testing.assert_close(loss_function(config, 3, torch.full((3,), 2.5))(logits, y), plain)  # uniform: same
    weight = torch.tensor([1.0, 2.0, 5.0])
    rows = [loss_function(config, 3)(logits[i : i + 1], y[i : i + 1]) for i in range(12)]
    expected = sum(r * weight[c] for r, c in zip(rows, y)) / weight[y].sum()
    torch.testing.assert_close(loss_function(config, 3, weight)(logits, y), expected)


# ---------------------------------------------------------------------------- the balanced sampler
def drawn_labels(tree: Path, cache: Path, out: Path, **overrides):
    """The labels of every training image the run drew, epoch after epoch (and the run)."""
    drawn = []
    original = loop.train_step

    def spy(run, idx, *args, **kwargs):
        drawn.append(idx.clone())
        return original(run, idx, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train_step", spy)
        run, _ = trained_run(config_for(tree, cache, **overrides), out)
    idx = torch.cat(drawn)
    assert set(idx.tolist()) <= set(run.split.train.tolist())  # never a validation or test image
    return torch.from_numpy(run.images.labels)[idx], run


def test_balanced_sampler_draws_every_class_about_equally_and_deterministically(imbalanced, tmp_path):
    epochs = 10
    labels, trainer = drawn_labels(imbalanced, tmp_path / "cache", tmp_path / "a", sampler="balanced", epochs=epochs)
    n_train = len(trainer.split.train)
    assert len(labels) == epochs * n_train
    counts = torch.bincount(labels, minlength=3).tolist()
    expected = len(labels) / 3
    assert all(abs(c - expected) < 0.25 * expected for c in counts), counts  # > 3.5 sigma at these sizes
    same, _ = drawn_labels(imbalanced, tmp_path / "cache", tmp_path / "b", sampler="balanced", epochs=epochs)
    assert torch.equal(same, labels)
    other, _ = drawn_labels(imbalanced, tmp_path / "cache", tmp_path / "c", sampler="balanced", epochs=epochs, seed=1)
    assert not torch.equal(other, labels)
    shuffled, _ = drawn_labels(imbalanced, tmp_path / "cache", tmp_path / "d", epochs=epochs)
    train_counts = list(trainer.data.class_counts["train"].values())
    assert torch.bincount(shuffled, minlength=3).tolist() == [epochs * c for c in train_counts]


@pytest.mark.parametrize("option", ["sampler", "class_weights"])
def test_a_killed_run_with_the_option_resumes_to_the_same_history(imbalanced, tmp_path, option):
    config = config_for(imbalanced, tmp_path / "cache", epochs=3, flip=True, **{option: "balanced"})
    reference = train(config, tmp_path / "reference", log=quiet)

    def kill_after_epoch_1(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_training(config, out, log=quiet, on_epoch=kill_after_epoch_1)
    messages = []
    resumed = run_training(config, out, log=messages.append)
    assert any("resuming from epoch 1" in m for m in messages)
    assert history_without_time(resumed.history) == history_without_time(reference.history)


# ---------------------------------------------------------------------------- the metrics
@pytest.mark.parametrize("seed", range(6))
def test_balanced_accuracy_and_macro_f1_equal_sklearns(seed):
    rng = np.random.default_rng(seed)
    k, n = 5, int(rng.integers(5, 60))
    y = rng.integers(0, k - (seed % 2), n)  # odd seeds: one class absent from the labels
    probs = torch.from_numpy(rng.random((n, k)))
    if seed % 3 == 0:
        probs[:, 2] = 0  # a class never predicted
    pred = probs.argmax(1).numpy()
    logits = probs.log()[None]  # one view whose softmax ranks the classes as probs does
    result = scores(logits, torch.from_numpy(y), [f"c{i}" for i in range(k)], loss="ce", label_smoothing=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        expected_balanced = balanced_accuracy_score(y, pred)
    assert result["balanced_accuracy"] == pytest.approx(expected_balanced, abs=1e-12)
    assert result["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)


def test_every_epoch_records_balanced_accuracy_and_macro_f1_as_evaluate_does(imbalanced, tmp_path):
    from transferlab.data.split import split_arrays, split_for
    from transferlab.inference.evaluate import evaluate_arrays

    config = config_for(imbalanced, tmp_path / "cache", epochs=2)
    result = train(config, tmp_path / "run", log=quiet)
    for row in result.history:
        assert all(0 <= row[f"{s}_{m}"] <= 1 for s in ("train", "val") for m in ("balanced_accuracy", "macro_f1"))
    from transferlab.inference.predict import load_checkpoint

    images = load_images(config)
    x, y = split_arrays(images, split_for(images, config), "val")
    evaluated = evaluate_arrays(load_checkpoint(result.out_dir / "best.pt", "cpu"), x, y)
    assert evaluated["balanced_accuracy"] == pytest.approx(result.best["val_balanced_accuracy"], abs=1e-6)
    assert evaluated["macro_f1"] == pytest.approx(result.best["val_macro_f1"], abs=1e-6)


# ---------------------------------------------------------------------------- selection by the new metrics
def test_a_study_selects_by_val_macro_f1(imbalanced, tmp_path):
    grid = {"strategy": ["frozen"], "batch_size": [8, 16], "epochs": [3]}
    spec = write_spec(
        tmp_path / "s.toml", imbalanced, tmp_path / "cache", grid, top={"metric": "val_macro_f1"}, head="linear", lr=0.3
    )
    directory = run_study(spec, study_dir=tmp_path / "out")
    study = load_study(directory)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs["kind"] == "run"]
    for t in trials:
        best = max(t.user_attrs["history"], key=lambda r: r["val_macro_f1"])
        assert t.value == best["val_macro_f1"] == t.user_attrs["best"]["val_macro_f1"]
        checkpoint = torch.load(directory / t.user_attrs["checkpoint"], weights_only=True)
        assert checkpoint["metric"] == "val_macro_f1" and checkpoint["epoch"] == t.user_attrs["best"]["epoch"]
    selected = study.user_attrs["selected"]
    assert selected["trial"] == max(trials, key=lambda t: (t.value, -t.number)).number
    assert selected["metric"] == "val_macro_f1" and 0 <= selected["test_macro_f1"] <= 1
    run_dir = directory / next(t for t in trials if t.number == selected["trial"]).user_attrs["run_dir"]
    assert selected["class_counts"] == json.loads((run_dir / "metrics.json").read_text())["class_counts"]
    report = (directory / "report.md").read_text()
    counts = selected["class_counts"]
    assert f"| blue | {counts['train']['blue']} | {counts['val']['blue']} | {counts['test']['blue']} | 4 |" in report
    assert "test macro-F1" in report and "best val macro-F1" in report


def test_each_new_option_is_part_of_the_identity(imbalanced):
    from transferlab.study.identity import trial_identity

    config = config_for(imbalanced, "cache")
    for option in ("class_weights", "sampler"):
        changed = config_for(imbalanced, "cache", **{option: "balanced"})
        assert identity(changed)[option] == "balanced"
        assert trial_identity({}, changed, "data") != trial_identity({}, config, "data")


# ---------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--class-weights", "foo"], "'foo'"),
        (["--sampler", "x"], "'x'"),
        (["--metric", "val_f1"], "'val_f1'"),
        (["--set", "class_weights=foo"], "class_weights = 'foo'"),
        (["--class-weights", "balanced", "--sampler", "balanced"], "corrects the imbalance twice"),
    ],
)
def test_bad_values_are_one_line_errors(imbalanced, tmp_path, capsys, extra, fragment):
    try:
        status = main(train_args(imbalanced, tmp_path / "run", tmp_path / "cache", *extra))
    except SystemExit as exit_info:  # argparse's own choices
        status = exit_info.code
    assert status == 2
    assert_one_line_error(capsys.readouterr(), fragment)
    assert not (tmp_path / "run").exists()


def test_an_unknown_study_metric_is_one_line(imbalanced, tmp_path, capsys):
    grid = {"strategy": ["frozen"], "batch_size": [8], "epochs": [1]}
    spec = write_spec(tmp_path / "s.toml", imbalanced, tmp_path / "cache", grid, top={"metric": "val_f1"})
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr(), "metric = 'val_f1'", "val_macro_f1")
