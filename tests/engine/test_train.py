"""One training run: the run directory, determinism, the frozen-feature cache, recorded epochs, resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_one_line_error,
    built_run,
    history_without_time,
    quiet,
    tiny_config,
    train_args,
)
from PIL import Image

from transferlab import RunConfig, train
from transferlab.cli import main
from transferlab.data.sources import load_images
from transferlab.engine.checkpoint import CHECKPOINT_FORMAT
from transferlab.engine.features import FeatureCache
from transferlab.engine.run import batch_bounds, lr_factor
from transferlab.engine.train import run_training
from transferlab.errors import RunFolderError, TrainingError

ROW_KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "lr"} | {
    f"{split}_{name}" for split in ("train", "val") for name in ("balanced_accuracy", "macro_f1")
}


def run(config, out_dir, **kwargs):
    return train(config, out_dir, log=quiet, **kwargs)


def assert_histories_close(a: list[dict], b: list[dict], *, loss_tol: float, n_val: int) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert row_a["epoch"] == row_b["epoch"]
        for key in ("train_loss", "val_loss"):
            assert row_a[key] == pytest.approx(row_b[key], abs=loss_tol), (key, row_a, row_b)
        # fp16 features may move at most one borderline prediction
        assert abs(row_a["val_accuracy"] - row_b["val_accuracy"]) <= 1 / n_val + 1e-9, (row_a, row_b)


# ---------------------------------------------------------------------------- the run directory
def test_run_directory(trained_run):
    out = trained_run.out_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    for row in metrics["history"]:
        assert set(row) == ROW_KEYS
        assert row["seconds"] > 0 and 0 <= row["train_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
        assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    best = max(metrics["history"], key=lambda r: r["val_accuracy"])
    assert metrics["best_epoch"] == best["epoch"] == trained_run.best_epoch
    assert metrics["best_val_accuracy"] == best["val_accuracy"] == trained_run.best_val_accuracy
    assert metrics["classes"] == ["blue", "green", "red"]
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (27, 9, 9)
    assert metrics["input_path"] == "cached" and metrics["weights"].startswith("none")
    assert {"python", "torch", "device"} <= set(metrics["environment"])
    assert json.loads((out / "config.json").read_text()) == metrics["config"]
    split = json.loads((out / "split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (27, 9, 9)
    assert (out / "best.pt").is_file() and not (out / "state.pt").exists()
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
    assert trained_run.checkpoints == {2: out / "best.pt"}


def test_checkpoint_contents(trained_run):
    ckpt = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["arch"] == "squeezenet1_1" and ckpt["head"] == "linear"
    assert ckpt["classes"] == ["blue", "green", "red"] and ckpt["resolution"] == 32
    assert ckpt["epoch"] == trained_run.best_epoch and ckpt["val_accuracy"] == trained_run.best_val_accuracy
    assert ckpt["mean"] == pytest.approx([0.485, 0.456, 0.406]) and ckpt["loss"] == "ce"
    assert ckpt["model"]["classifier.3.weight"].shape == (3, 512)


def test_a_learnable_task_is_learned(trained_run):
    assert trained_run.best_val_accuracy > 0.5  # chance is 1/3


def test_same_config_same_history(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache", strategy="partial", epochs=2, flip=True, dropout=0.5)
    first = run(config, tmp_path / "a")
    second = run(config, tmp_path / "b")
    assert history_without_time(first.history) == history_without_time(second.history)
    different = run(
        tiny_config(image_tree, tmp_path / "cache", strategy="partial", epochs=2, flip=True, seed=1), tmp_path / "c"
    )
    assert history_without_time(different.history) != history_without_time(first.history)


# ---------------------------------------------------------------------------- frozen-feature cache
@pytest.mark.parametrize("strategy, flip", [("frozen", False), ("partial", False), ("frozen", True), ("partial", True)])
def test_cached_features_match_the_uncached_path(image_tree, tmp_path, strategy, flip):
    common = dict(strategy=strategy, flip=flip, epochs=2, head="linear")  # default optimiser and lr
    cached = run(tiny_config(image_tree, tmp_path / "cache", **common), tmp_path / "cached")
    plain = run(tiny_config(image_tree, tmp_path / "cache", cache_features="off", **common), tmp_path / "plain")
    assert (cached.feature_path, plain.feature_path) == ("cached", "images")
    assert_histories_close(cached.history, plain.history, loss_tol=1e-2, n_val=9)


@pytest.mark.parametrize(
    "overrides, path",
    [
        ({"strategy": "full"}, "images"),
        ({"crop_padding": 2}, "images"),
        ({"cache_features": "off"}, "images"),
        ({"tta_flip": True}, "cached"),
    ],
)
def test_input_path_choice(image_tree, tmp_path, overrides, path):
    assert run(tiny_config(image_tree, tmp_path / "cache", **overrides), tmp_path / "run").feature_path == path


@pytest.mark.parametrize("cache_features", ["auto", "off"])
def test_feature_shift_moves_training_inputs_by_whole_cells(image_tree, tmp_path, cache_features):
    config = tiny_config(image_tree, tmp_path / "cache", resolution=64, feature_shift=1, cache_features=cache_features)
    run = built_run(config, tmp_path / "run")
    idx = torch.arange(8)
    plain = run.inputs.features(idx)
    shifted, _ = run.inputs.training_batch(idx, run.labels, run.config, run.augment_generator)
    assert shifted.shape == plain.shape
    assert not torch.equal(shifted, plain)  # 8 images, 9 offsets each: all nine at (0, 0) would be a broken shift
    padded = F.pad(plain, (1, 1, 1, 1))
    h, w = plain.shape[-2:]
    for i in range(len(idx)):  # each training input is its evaluation input moved by at most one cell
        assert any(
            torch.allclose(shifted[i], padded[i, :, dy : dy + h, dx : dx + w], atol=1e-3)
            for dy in range(3)
            for dx in range(3)
        ), i


def test_feature_cache_is_reused_in_memory_and_on_disk(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache")
    images = load_images(config)
    cache = FeatureCache(tmp_path / "features")
    first = run(config, tmp_path / "a", images=images, feature_cache=cache)
    assert (cache.misses, cache.hits) == (1, 0) and len(list((tmp_path / "features").glob("*.npy"))) == 1
    second = run(config, tmp_path / "b", images=images, feature_cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    fresh = FeatureCache(tmp_path / "features")  # another process: read back from disk
    third = run(config, tmp_path / "c", images=images, feature_cache=fresh)
    assert (fresh.misses, fresh.hits) == (0, 1)
    assert (
        history_without_time(first.history)
        == history_without_time(second.history)
        == history_without_time(third.history)
    )


def test_feature_cache_key_follows_the_weights_file(image_tree, tmp_path, features_weights):
    config = tiny_config(image_tree, tmp_path / "cache")
    cache = FeatureCache(None)
    run(config, tmp_path / "a", feature_cache=cache)
    result = run(
        RunConfig.from_dict({"weights": str(features_weights)}, base=config), tmp_path / "b", feature_cache=cache
    )
    assert cache.misses == 2 and result.feature_path == "cached"
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["weights"] == str(features_weights)


# ---------------------------------------------------------------------------- losses and options
def test_mse_loss(image_tree, tmp_path):
    result = run(tiny_config(image_tree, tmp_path / "cache", loss="mse", epochs=2), tmp_path / "run")
    for row in result.history:
        assert 0 <= row["train_loss"] <= 2 and 0 <= row["val_loss"] <= 2  # squared error of probabilities
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["loss"] == "mse"


def test_dataset_normalisation_is_stored_in_the_checkpoint(image_tree, tmp_path):
    run(tiny_config(image_tree, tmp_path / "cache", normalize="dataset"), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["mean"] != pytest.approx([0.485, 0.456, 0.406])
    assert 0 < min(ckpt["std"]) and max(ckpt["mean"]) < 1


def test_dataset_normalisation_of_a_constant_channel_is_refused_in_one_line(tmp_path, capsys):

    from transferlab.cli import main

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[..., 2] = 0  # no blue anywhere
            Image.fromarray(pixels).save(tmp_path / "tree" / name / f"{i}.png")
    argv = ["train", "--data", str(tmp_path / "tree"), "--cache-dir", str(tmp_path / "cache"), "--weights", "none",
            "--resolution", "32", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main([*argv, "--normalize", "dataset"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blue channel" in err and "std 0" in err, err
    assert not (tmp_path / "run" / "best.pt").exists()
    assert main(argv) == 0  # ImageNet statistics: the same images train


def test_limit_uses_a_subset(image_tree, tmp_path):
    run(tiny_config(image_tree, tmp_path / "cache", limit=30), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 30


@pytest.mark.parametrize(
    "schedule, checks",
    [
        ("constant", [(0, 1.0), (99, 1.0)]),
        ("step", [(0, 1.0), (29, 1.0), (30, 0.1), (60, pytest.approx(0.01))]),
        ("cosine", [(0, 1.0), (5, pytest.approx(0.5)), (10, pytest.approx(0.0, abs=1e-12))]),
        ("onecycle", [(0, pytest.approx(1 / 3)), (2, 1.0), (3, 1.0), (4, pytest.approx(1 - 1 / 7)), (10, 0.0)]),
    ],
)
def test_learning_rate_schedules(schedule, checks):
    config = RunConfig.from_dict({"schedule": schedule, "epochs": 10, "step_every": 30})
    for epoch, expected in checks:  # one step per epoch
        assert lr_factor(config, epoch, 1) == expected, (schedule, epoch)


def test_warmup_is_linear():
    config = RunConfig.from_dict({"warmup_epochs": 2})
    assert [lr_factor(config, s, 2) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


# ---------------------------------------------------------------------------- recorded epochs
def test_record_epochs_share_one_computation(image_tree, tmp_path):
    long = run(
        tiny_config(image_tree, tmp_path / "cache", epochs=3, record_epochs=[1, 2], head="linear", lr=1e-2),
        tmp_path / "long",
    )
    short = run(tiny_config(image_tree, tmp_path / "cache", epochs=2, head="linear", lr=1e-2), tmp_path / "short")
    assert history_without_time(long.history[:2]) == history_without_time(short.history)
    assert set(long.checkpoints) == {1, 2, 3}
    assert long.checkpoints[2] == tmp_path / "long" / "best-epoch2.pt" and long.checkpoints[2].is_file()
    assert (tmp_path / "long" / "best-epoch1.pt").is_file() and not (tmp_path / "long" / "best-epoch3.pt").exists()
    recorded = torch.load(long.checkpoints[2], weights_only=True)
    reference = torch.load(tmp_path / "short" / "best.pt", weights_only=True)
    assert recorded["epoch"] == reference["epoch"] == long.at_epoch(2)["best_epoch"] == short.best_epoch
    for key, value in reference["model"].items():
        assert torch.equal(recorded["model"][key], value), key


# ---------------------------------------------------------------------------- resuming
def test_interrupted_run_resumes_to_the_same_history(image_tree, tmp_path):
    config = tiny_config(
        image_tree, tmp_path / "cache", strategy="partial", epochs=3, flip=True, head="linear", lr=1e-2
    )
    reference = run(config, tmp_path / "reference")

    def kill_after_epoch_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_training(config, out, log=quiet, on_epoch=kill_after_epoch_2)
    assert (out / "state.pt").is_file()
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2

    messages = []
    resumed = run_training(config, out, log=messages.append)
    assert any("resuming from epoch 2" in m for m in messages)
    assert history_without_time(resumed.history) == history_without_time(reference.history)
    assert resumed.best_epoch == reference.best_epoch
    assert not (out / "state.pt").exists()
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3


def test_state_of_another_config_is_not_resumed(image_tree, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(image_tree, tmp_path / "cache", epochs=3), out, log=quiet,
                     on_epoch=lambda row: (_ for _ in ()).throw(KeyboardInterrupt()))  # fmt: skip
    other = tiny_config(image_tree, tmp_path / "cache", epochs=3, lr=0.5)
    with pytest.raises(RunFolderError, match=r"lr 0.001 there, 0.5 here.*--overwrite"):  # the killed run is kept
        run_training(other, out, log=quiet)
    assert (out / "state.pt").is_file()
    messages = []
    result = run_training(other, out, log=messages.append, overwrite=True)
    assert not any("resuming" in m for m in messages) and len(result.history) == 3


# ---------------------------------------------------------------------------- diverging runs
def test_training_error_is_raised_by_the_library(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache", optimizer="sgd", lr=1e30, head="linear")
    with pytest.raises(TrainingError, match="not finite|nan|inf"):
        run(config, tmp_path / "run")


# ---------------------------------------------------------------------------- tracebacks
def test_batches_merge_a_last_batch_of_one():
    assert batch_bounds(17, 8) == [(0, 8), (8, 17)]
    assert batch_bounds(16, 8) == [(0, 8), (8, 16)]
    assert batch_bounds(9, 8) == [(0, 9)] and batch_bounds(1, 8) == [(0, 1)] and batch_bounds(2, 1) == [(0, 1), (1, 2)]


def test_a_last_training_batch_of_one_image_trains_batchnorm(make_tree, tmp_path):
    """27 training images (45 images, 20% test, 20% val) in batches of 13: the third batch would be one image, which
    BatchNorm in the mlp head cannot train on; it joins the batch before."""
    tree = make_tree("images", per_class=15, size=16)
    config = tiny_config(tree, tmp_path / "cache", head="mlp", batch_size=13, epochs=2)
    result = run_training(config, tmp_path / "run", log=quiet)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_train"] % 13 == 1 and len(result.history) == 2


def test_batch_size_1_with_a_trainable_batchnorm_is_one_line(image_tree, tmp_path, capsys):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--head", "mlp", "--batch-size", "1")
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "batch_size = 1", "BatchNorm", "2 or more")
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--head", "linear", "--batch-size", "1")
    assert main(args) == 0  # no BatchNorm trains: one image a batch is allowed


# ---------------------------------------------------------------------------- found by a hostile tester
def test_one_training_image_with_batchnorm_asks_for_images_not_a_batch_size(make_tree, tmp_path, capsys):
    tree = make_tree("images", per_class=8, size=16)
    rows = ["path,label,split", f"{tree}/red/000.png,red,train"]
    rows += [f"{tree}/{c}/{i:03d}.png,{c},val" for c in ("red", "green") for i in range(1, 4)]
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(rows) + "\n")
    args = ["train", "--labels", str(table), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
            "--weights", "none", "--head", "mlp", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "holds 1 image", "add training images")


def test_epochs_csv_holds_the_history_a_row_per_epoch(trained_run):
    import csv

    rows = list(csv.DictReader((trained_run.out_dir / "epochs.csv").open()))
    history = json.loads((trained_run.out_dir / "metrics.json").read_text())["history"]
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history] == [1, 2]
    for row, recorded in zip(rows, history):
        assert set(row) == set(recorded)  # every number the history records, a column each
        assert all(float(row[k]) == recorded[k] for k in recorded)  # to the last digit


def test_a_batch_as_large_as_the_training_split_is_named(image_tree, tmp_path):
    lines: list[str] = []
    train(tiny_config(image_tree, tmp_path / "cache", batch_size=250), tmp_path / "big", log=lines.append)
    assert any("batch size 250 holds the whole training split" in line and "would take 8" in line for line in lines), (
        lines
    )
    lines.clear()
    train(tiny_config(image_tree, tmp_path / "cache"), tmp_path / "small", log=lines.append)
    assert not any("holds the whole training split" in line for line in lines)
