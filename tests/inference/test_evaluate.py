"""Checkpoints in use: evaluate on any ImageFolder tree (classes matched by name), predict files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    CLASS_COLOURS,
    TEST_DEVICE,
    assert_one_line_error,
    make_image_tree,
    noise_image,
    quiet,
    tiny_config,
    train_args,
)
from PIL import Image

from transferlab.cli import main
from transferlab.data.sources import load_image_folder, scan_image_folder
from transferlab.engine.train import run_training
from transferlab.errors import (
    CheckpointError,
    DataError,
)
from transferlab.inference.evaluate import evaluate_checkpoint
from transferlab.inference.predict import load_checkpoint, predict_files


@pytest.fixture
def best(trained_run):
    return trained_run.out_dir / "best.pt"


def test_checkpoint_reproduces_the_validation_metrics(trained_run, best, image_tree, cache_dir):
    data = load_image_folder(image_tree, cache_dir, progress=False)
    split = json.loads((trained_run.out_dir / "split.json").read_text())
    result = evaluate_checkpoint(best, data, indices=np.asarray(split["val"]), device=TEST_DEVICE)
    row = trained_run.history[trained_run.best_epoch - 1]
    assert result["n"] == len(split["val"])
    assert result["accuracy"] == pytest.approx(row["val_accuracy"])
    assert result["loss"] == pytest.approx(row["val_loss"], rel=1e-4)


def test_unseen_tree_with_a_subset_of_classes(best, make_tree, cache_dir):
    # Only two of the three classes, so folder index != checkpoint index: labels are matched by name.
    root = make_tree("unseen", classes=("red", "blue"), per_class=7, size=20, seed=99)
    data = load_image_folder(root, cache_dir, progress=False)
    assert data.classes == ["blue", "red"]
    result = evaluate_checkpoint(best, data, device=TEST_DEVICE)
    assert result["n"] == 14 and result["classes"] == ["blue", "green", "red"]
    confusion = np.asarray(result["confusion_matrix"])
    assert confusion.shape == (3, 3) and confusion.sum(1).tolist() == [7, 0, 7]
    assert result["per_class_accuracy"]["green"] is None
    assert result["accuracy"] == pytest.approx((confusion[0, 0] + confusion[2, 2]) / 14)
    # the same figure computed by hand from the probabilities
    loaded = load_checkpoint(best, TEST_DEVICE)
    predicted = [loaded.classes[i] for i in loaded.probabilities(data.images).argmax(1).tolist()]
    truth = [data.classes[i] for i in data.labels]
    assert result["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]))


def test_unknown_class_folder(best, make_tree, cache_dir):
    root = make_tree("other", classes=("red", "grey"), per_class=3, size=16)
    data = load_image_folder(root, cache_dir, progress=False)
    with pytest.raises(DataError, match="'grey' is not one of the checkpoint's classes"):
        evaluate_checkpoint(best, data, device=TEST_DEVICE)


def test_predict_files(best, tmp_path):
    rng = np.random.default_rng(5)
    files = []
    for name, size in (("red", (24, 24)), ("blue", (30, 20))):  # the second is not square
        path = tmp_path / f"{name}.png"
        Image.fromarray(noise_image(CLASS_COLOURS[name], size, rng)).save(path)
        files.append(path)
    results = predict_files(best, files, top=2, device=TEST_DEVICE)
    assert [r["file"] for r in results] == [str(f) for f in files]
    for r in results:
        assert len(r["top"]) == 2
        probabilities = [t["probability"] for t in r["top"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        assert {t["class"] for t in r["top"]} <= {"blue", "green", "red"}
    everything = predict_files(best, files[:1], top=10, device=TEST_DEVICE)[0]["top"]
    assert len(everything) == 3 and sum(t["probability"] for t in everything) == pytest.approx(1, abs=1e-5)


def test_predict_unreadable_file_is_reported_and_the_others_still_predicted(best, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    Image.fromarray(noise_image(CLASS_COLOURS["red"], 24, np.random.default_rng(0))).save(tmp_path / "good.png")
    bad, good = predict_files(best, [tmp_path / "bad.jpg", tmp_path / "good.png"], device=TEST_DEVICE)
    assert "bad.jpg" in bad["error"] and "top" not in bad
    assert good["file"].endswith("good.png") and len(good["top"]) == 3


def test_load_checkpoint(best):
    loaded = load_checkpoint(best, TEST_DEVICE)
    assert loaded.classes == ["blue", "green", "red"] and loaded.loss == "ce" and not loaded.model.training
    assert loaded.info["arch"] == "squeezenet1_1" and loaded.info["resolution"] == 32
    probs = loaded.probabilities(np.zeros((2, 32, 32, 3), np.uint8))
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    assert loaded.probabilities(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 3)


def test_not_a_checkpoint(tmp_path, features_weights):
    with pytest.raises(CheckpointError, match="not a transferlab checkpoint"):
        load_checkpoint(features_weights, TEST_DEVICE)  # a state dict of tensors, but not ours
    (tmp_path / "notes.pt").write_text("hello\n")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as error:
        load_checkpoint(tmp_path / "notes.pt", TEST_DEVICE)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt", TEST_DEVICE)


@pytest.mark.parametrize(
    "overrides",
    [
        {"tta_flip": True},
        {"normalize": "dataset"},
        {"loss": "mse"},
        {"strategy": "partial", "flip": True},
        {"strategy": "full", "crop_padding": 2},
        {"resolution": 48},
    ],
    ids=["tta", "dataset-norm", "mse", "partial-flip", "full-crop", "upsampled"],
)
def test_checkpoint_evaluation_matches_training_validation(overrides, image_tree, tmp_path):
    """Whatever the run's options, its best.pt scores its validation split as the trainer did."""
    from helpers import quiet, tiny_config

    from transferlab import train

    result = train(
        tiny_config(image_tree, tmp_path / "cache", head="linear", lr=1e-2, epochs=2, **overrides),
        tmp_path / "run",
        log=quiet,
    )
    data = load_image_folder(image_tree, tmp_path / "cache", progress=False)
    val = np.asarray(json.loads((tmp_path / "run" / "split.json").read_text())["val"])
    evaluated = evaluate_checkpoint(tmp_path / "run" / "best.pt", data, indices=val, device=TEST_DEVICE)
    row = result.history[result.best_epoch - 1]
    assert evaluated["accuracy"] == pytest.approx(row["val_accuracy"])
    assert evaluated["loss"] == pytest.approx(row["val_loss"], rel=1e-3)


def run(config, out, **kwargs):
    return run_training(config, out, log=quiet, **kwargs)


# ---------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize(
    "overrides",
    [{}, {"tta_flip": True, "flip": True}, {"cache_features": "off"}, {"strategy": "full"}, {"loss": "mse"}],
    ids=["cached", "cached-tta", "images", "full", "mse"],
)
def test_evaluate_val_reproduces_the_recorded_validation(overrides, image_tree, tmp_path, capsys):
    config = tiny_config(image_tree, tmp_path / "cache", epochs=2, head="linear", lr=1e-2, **overrides)
    result = run(config, tmp_path / "run")
    args = ["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(image_tree), "--device", "cpu", "--json"]
    assert main([*args, "--split", "val"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == result.best["val_accuracy"]
    assert evaluated["loss"] == pytest.approx(result.best["val_loss"], rel=1e-5, abs=1e-6)


def test_evaluate_on_the_runs_own_data_defaults_to_its_test_split(trained_run, image_tree, capsys):
    args = ["evaluate", str(trained_run.out_dir / "best.pt"), "--data", str(image_tree), "--json", "--device", "cpu"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    test = json.loads((trained_run.out_dir / "split.json").read_text())["test"]
    assert result["split"] == "test" and result["n"] == len(test) == 9


def test_evaluate_without_a_test_split_says_so(image_tree, tmp_path, capsys):
    run(tiny_config(image_tree, tmp_path / "cache", test_fraction=0.0), tmp_path / "run")
    for extra in ([], ["--split", "test"]):
        args = ["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(image_tree), "--device", "cpu", *extra]
        assert main(args) == 2
        assert_one_line_error(capsys.readouterr(), "no test split")


def test_evaluate_knows_the_runs_own_folder(tmp_path, capsys):
    data = make_image_tree(tmp_path / "data", per_class=12, size=16)
    (data / "red" / "broken.png").write_bytes(b"garbage")
    out, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.warns(UserWarning, match="skipped 1"):
        assert main(train_args(data, out, cache, "--skip-bad-images")) == 0
    n_test = json.loads((out / "metrics.json").read_text())["n_test"]
    best = str(out / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu"]) == 0  # the run's setting
    result = json.loads(capsys.readouterr().out)
    assert (result["split"], result["n"]) == ("test", n_test)
    (data / "red" / "broken.png").unlink()  # a skipped file gone: the same images, so the same split
    assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu"]) == 0
    assert (json.loads(capsys.readouterr().out)["n"]) == n_test
    shutil.copy(data / "red" / "000.png", data / "red" / "0005.png")  # a new image shifts the rows: the split is off
    for extra in ([], ["--split", "test"]):
        assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu", *extra]) == 2
        assert_one_line_error(capsys.readouterr(), "the folder the run trained on", "--split all")
    assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu", "--split", "all"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 37 and "includes the images it was trained on" in captured.err


# ---------------------------------------------------------------------------- the storage transform
def test_evaluate_knows_a_moved_copy_of_the_training_folder(trained_run, image_tree, tmp_path, capsys):
    copy = tmp_path / "elsewhere" / "images"
    shutil.copytree(image_tree, copy)  # new modification times and a new place: the same images
    best = str(trained_run.out_dir / "best.pt")
    cache = ["--device", "cpu", "--json"]
    assert main(["evaluate", best, "--data", str(copy), *cache]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test"  # the run's own test split, from its split.json
    assert result["n"] == len(json.loads((trained_run.out_dir / "split.json").read_text())["test"])
    assert main(["evaluate", best, "--data", str(copy), "--split", "all", *cache]) == 0
    assert "includes the images it was trained on" in capsys.readouterr().err


# ---------------------------------------------------------------------------- found by a hostile tester
def test_evaluate_counts_the_runs_images_in_other_data_and_keeps_its_split_to_its_own(
    trained_run, image_tree, tmp_path, capsys
):
    changed = tmp_path / "changed"
    shutil.copytree(image_tree, changed)
    split = json.loads((trained_run.out_dir / "split.json").read_text())
    first = scan_image_folder(changed).files[split["train"][0]][0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(first)  # one training image differs: these are no longer the run's rows
    best = str(trained_run.out_dir / "best.pt")
    assert main(["evaluate", best, "--data", str(changed), "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["split"] == "all" and result["seen_in_training"] == {"train": len(split["train"]) - 1,
                                                                       "val": len(split["val"])}  # fmt: skip
    assert "images the run trained on" in captured.err
    assert main(["evaluate", best, "--data", str(changed), "--split", "test", "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr(), "--split test", "not the data the run was split from")


def test_evaluate_prints_its_figures_on_one_line_and_counts_ties(trained_run, image_tree, tmp_path, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    for key in [k for k in raw["model"] if k.startswith("classifier.")]:
        raw["model"][key] = torch.zeros_like(raw["model"][key])  # every class scores the same
    torch.save(raw, tmp_path / "flat.pt")
    assert main(["evaluate", str(tmp_path / "flat.pt"), "--data", str(image_tree), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "accuracy" in line and "95% CI" in line)
    assert line.startswith("test split, ") and "loss" in line
    assert "have top classes the model scores equally" in out


# ---------------------------------------------------------------------------- a run folder instead of its best.pt
def test_a_run_folder_stands_for_its_best_pt_and_evaluate_defaults_to_the_recorded_data(
    trained_run, image_tree, tmp_path, capsys
):
    run = str(trained_run.out_dir)
    best = str(trained_run.out_dir / "best.pt")
    assert main(["evaluate", best, "--data", str(image_tree), "--json", "--device", "cpu"]) == 0
    named = json.loads(capsys.readouterr().out)
    assert main(["evaluate", run, "--json", "--device", "cpu"]) == 0  # no --data: the run's own, its test split
    captured = capsys.readouterr()
    assert json.loads(captured.out) == named and named["split"] == "test"
    assert f"no --data: scoring the data the run recorded, {image_tree}" in captured.err
    image = str(next(image_tree.glob("red/*.png")))
    assert main(["predict", run, image, "--format", "json", "--device", "cpu"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert main(["predict", best, image, "--format", "json", "--device", "cpu"]) == 0
    assert by_folder == json.loads(capsys.readouterr().out)
    assert main(["export", run, "--format", "torchscript", "-o", str(tmp_path / "model.pt")]) == 0
    assert (tmp_path / "model.pt").is_file()


def test_a_folder_without_best_pt_and_recorded_data_that_moved_are_one_line(trained_run, image_tree, tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    for command in (["evaluate", str(empty)], ["predict", str(empty), str(next(image_tree.glob("red/*.png")))]):
        assert main(command) == 2
        assert_one_line_error(capsys.readouterr(), "not-a-run", "without best.pt")
    moved = tmp_path / "moved"
    shutil.copytree(trained_run.out_dir, moved)
    ckpt = torch.load(moved / "best.pt", weights_only=True)
    ckpt["config"]["data"] = str(tmp_path / "gone")
    torch.save(ckpt, moved / "best.pt")
    assert main(["evaluate", str(moved), "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr(), "gone", "not there any more", "--data")
