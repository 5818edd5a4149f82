"""Reliability of one run and its checkpoint: every number comes from the config, data and weights it names.

The spec these tests hold train / evaluate / predict to:
- state.pt resumes only the run it belongs to: same training settings, same data fingerprint, same split. A run
  folder holding another run's results (other settings, changed data) is refused in one line naming the difference;
  with overwrite it starts over, so no image trained on lands in validation or test, and the earlier run's results
  are removed when the new run writes its first epoch (not before: a new run that fails first loses nothing), so
  config.json never sits beside another run's best.pt. Two processes never train in one folder at once.
- A finished run directory rerun with the same settings returns its result without training; a kill between the
  last epoch and the end of the run does not retrain it either.
- What cannot work is refused before training (exit 2, one line): one class, a non-finite number, official_test on
  a folder, record_epochs beyond epochs, unfreeze beyond the backbone, cuda without CUDA, an --out that is a file,
  unwritable or inside the data folder, an unwritable cache folder.
- A run whose loss stops being finite ends with one line (exit 1) and keeps no checkpoint from the bad epoch.
- The selection metric picks the best epoch, its checkpoint and the reported figures (val_loss: the lowest).
- The frozen-feature cache key holds everything the activations depend on: a random initialisation's seed, the
  weights file's content and TRANSFERLAB_WEIGHTS, the device type.
- evaluate on the run's own data scores its test split unless told otherwise, says "no test split" when there is
  none, and `--split val` reproduces the recorded validation figures on every input path.
- Bad checkpoint and weights files (empty, text, random bytes, truncated, a directory) are one line each, and never
  advise loading with weights_only=False. `predict --top 0` is refused; a bad file among good ones is reported
  and the good ones are still predicted.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import make_image_tree, quiet, tiny_config
from test_cli import assert_one_line_error, train_args

from transferlab import RunConfig
from transferlab.cli import main
from transferlab.engine import loop
from transferlab.engine.features import FeatureCache, feature_key
from transferlab.engine.preprocess import Preprocess
from transferlab.engine.train import run_training
from transferlab.errors import RunFolderError, TrainingError
from transferlab.models.weights import weights_identity
from transferlab.scoring.selection import improves


def run(config, out, **kwargs):
    return run_training(config, out, log=quiet, **kwargs)


def stop_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return on_epoch


# ---------------------------------------------------------------------------- resume and reuse
def test_resume_with_changed_data_starts_over_on_the_new_split(make_tree, tmp_path):
    data = make_tree("images", per_class=12, size=16)
    config = tiny_config(data, tmp_path / "cache", epochs=3)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(config, out, log=quiet, on_epoch=stop_after(1))
    first_split = json.loads((out / "split.json").read_text())
    make_image_tree(data, classes=("red",), per_class=20, size=16, seed=7)  # more red images under the same path

    with pytest.raises(RunFolderError, match="the data"):  # the killed run's state is kept
        run_training(config, out, log=quiet)
    messages = []
    result = run_training(config, out, log=messages.append, overwrite=True)
    assert any("replacing" in m and "data" in m for m in messages), messages
    assert not any("resuming" in m for m in messages)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    split = json.loads((out / "split.json").read_text())
    assert split != first_split
    assert json.loads((out / "metrics.json").read_text())["identity"]["split"] != ""


def test_rerun_with_another_config_leaves_no_file_of_the_old_run(image_tree, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(image_tree, tmp_path / "cache", epochs=2, record_epochs=[1]), out)
    assert (out / "best-epoch1.pt").is_file()
    with pytest.raises(KeyboardInterrupt):  # the new run is killed before its first epoch ends
        run_training(tiny_config(image_tree, tmp_path / "cache", epochs=2, lr=0.05), out, log=quiet, overwrite=True,
                     on_epoch=stop_after(1))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.05
    assert torch.load(out / "best.pt", weights_only=True)["config"]["lr"] == 0.05
    assert not (out / "best-epoch1.pt").exists()


def test_rerun_with_another_config_killed_before_its_first_epoch(image_tree, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(tiny_config(image_tree, tmp_path / "cache", epochs=1), out)

    def killed(run, epoch, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(image_tree, tmp_path / "cache", epochs=1, lr=0.05), out, overwrite=True)
    # nothing of the new run was written, so nothing of the old one was lost: its config beside its own results
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001
    assert torch.load(out / "best.pt", weights_only=True)["config"]["lr"] == 0.001
    assert json.loads((out / "metrics.json").read_text())["finished"]


def test_finished_run_is_returned_without_training(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache", epochs=2)
    out = tmp_path / "run"
    first = run(config, out)
    stamp = (out / "best.pt").stat().st_mtime_ns
    messages = []
    again = run_training(config, out, log=messages.append)
    assert any("already finished" in m for m in messages)
    assert again.history == first.history and again.best_epoch == first.best_epoch
    assert (out / "best.pt").stat().st_mtime_ns == stamp


def test_kill_between_last_epoch_and_the_end_does_not_retrain(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache", epochs=2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # the last epoch is recorded, state.pt is still there
        run_training(config, out, log=quiet, on_epoch=stop_after(2))
    assert (out / "state.pt").is_file()
    messages = []
    result = run_training(config, out, log=messages.append)
    assert any("already finished" in m for m in messages) and len(result.history) == 2
    assert not (out / "state.pt").exists()


# ---------------------------------------------------------------------------- refused before training
@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--lr", "inf"], "lr = inf: must be a finite number"),
        (["--lr", "nan"], "lr = nan"),
        (["--weight-decay", "nan"], "weight_decay = nan"),
        (["--official-test"], "official_test: only the cifar10 source"),
        (["--record-epochs", "3"], "record_epochs = [3]: beyond epochs = 1"),
        (["--strategy", "partial", "--unfreeze", "9"], "unfreeze = 9: squeezenet1_1 has only 8"),
    ],
    ids=["lr-inf", "lr-nan", "decay-nan", "official-test-folder", "record-beyond", "unfreeze"],
)
def test_what_cannot_work_is_refused(extra, fragment, image_tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(image_tree, out, tmp_path / "cache", *extra)) == 2
    assert_one_line_error(capsys.readouterr(), fragment)
    assert not out.exists()


def test_one_class_is_refused(make_tree, tmp_path, capsys):
    data = make_tree("one", classes=("red",), per_class=10, size=16)
    assert main(train_args(data, tmp_path / "run", tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "1 class", "at least 2")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--device", "cuda")) == 2
    assert_one_line_error(capsys.readouterr(), "no CUDA device")


def test_bad_output_and_cache_folders(image_tree, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert main(train_args(image_tree, a_file, tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "--out", "is a file")
    assert main(train_args(image_tree, a_file / "sub", tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "--out", "not writable")
    assert main(train_args(image_tree, tmp_path / "run", a_file / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "--cache-dir", "not writable")
    assert a_file.read_text() == "keep me"


def test_out_inside_the_data_folder_is_refused(make_tree, tmp_path, capsys):
    data = make_tree("images", per_class=6, size=16)
    assert main(train_args(data, data / "runs" / "x", tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "inside the data folder")
    assert not (data / "runs").exists()


# ---------------------------------------------------------------------------- diverging runs
def test_a_diverging_run_stops_with_one_line_and_no_checkpoint(image_tree, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--optimizer", "sgd", "--lr", "1e30", "--head", "linear"]
    assert main(train_args(image_tree, out, tmp_path / "cache", *extra)) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # the log lines before it are the run's
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("transferlab: error: epoch 1") and "diverged" in errors[0]
    assert not (out / "best.pt").exists()


def test_training_error_is_raised_by_the_library(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache", optimizer="sgd", lr=1e30, head="linear")
    with pytest.raises(TrainingError, match="not finite|nan|inf"):
        run(config, tmp_path / "run")


# ---------------------------------------------------------------------------- the selection metric
def test_improves_follows_the_metric():
    a, b = {"val_accuracy": 0.5, "val_loss": 1.0}, {"val_accuracy": 0.6, "val_loss": 1.2}
    assert improves(b, a, "val_accuracy") and not improves(b, a, "val_loss")
    assert improves(a, b, "val_loss") and not improves(a, a, "val_loss")  # a tie keeps the earlier epoch


def test_val_loss_metric_picks_the_lowest_loss_epoch_and_its_checkpoint(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache", epochs=4, lr=0.3, head="linear", metric="val_loss")
    result = run(config, tmp_path / "run")
    losses = [r["val_loss"] for r in result.history]
    assert result.best_epoch == 1 + int(np.argmin(losses))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["epoch"] == result.best_epoch and ckpt["metric"] == "val_loss"
    assert ckpt["val_loss"] == min(losses)
    assert result.at_epoch(2)["best_epoch"] == 1 + int(np.argmin(losses[:2]))


# ---------------------------------------------------------------------------- the feature-cache key
def key_for(**changes):
    parts = dict(
        data="d",
        rows=np.arange(5),
        arch="squeezenet1_1",
        weights="none|seed=0",
        cut=3,
        preprocess=Preprocess((0.5,) * 3, (0.2,) * 3, 32),
        mirror=False,
        autocast=False,
        device=torch.device("cpu"),
    )
    parts.update(changes)
    return feature_key(**parts)


def test_feature_key_changes_with_every_input():
    base = key_for()
    changes = [
        dict(data="e"),
        dict(rows=np.arange(6)),
        dict(arch="squeezenet1_0"),
        dict(weights="none|seed=1"),
        dict(cut=4),
        dict(preprocess=Preprocess((0.5,) * 3, (0.2,) * 3, 48)),
        dict(mirror=True),
        dict(autocast=True),
        dict(device=torch.device("cuda")),
    ]
    keys = {key_for(**c) for c in changes}
    assert base not in keys and len(keys) == len(changes)


def test_random_initialisations_of_two_seeds_do_not_share_features(image_tree, tmp_path):
    cache = FeatureCache(None)
    config = tiny_config(image_tree, tmp_path / "cache")
    run(config, tmp_path / "a", feature_cache=cache)
    run(RunConfig.from_dict({"seed": 1}, base=config), tmp_path / "b", feature_cache=cache)
    assert cache.misses == 2 and cache.hits == 0


def test_weights_identity_follows_the_file_content_and_the_environment(features_weights, tmp_path, monkeypatch):
    copy = tmp_path / "w.pth"
    shutil.copy(features_weights, copy)
    before = weights_identity("squeezenet1_1", str(copy))
    state = torch.load(copy, weights_only=True)
    state["features.0.bias"] += 1
    torch.save(state, copy)
    assert weights_identity("squeezenet1_1", str(copy)) != before
    monkeypatch.setenv("TRANSFERLAB_WEIGHTS", str(copy))
    assert weights_identity("squeezenet1_1", "imagenet") == weights_identity("squeezenet1_1", str(copy))
    assert weights_identity("squeezenet1_1", "none", seed=3) == "none|seed=3"


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


# ---------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty (0 bytes)"),
        (b"hello\n", "not a file written by torch.save"),
        (bytes(range(256)) * 20, "not a file written by torch.save"),
        (None, "truncated"),
        ("dir", "a directory"),
    ],
    ids=["empty", "text", "random", "truncated", "directory"],
)
def test_bad_checkpoint_and_weights_files(content, fragment, trained_run, image_tree, tmp_path, capsys):
    path = tmp_path / "file.pt"
    if content == "dir":
        path.mkdir()
    elif content is None:
        path.write_bytes((trained_run.out_dir / "best.pt").read_bytes()[:3000])
    else:
        path.write_bytes(content)
    assert main(["evaluate", str(path), "--data", str(image_tree), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, fragment)
    assert "weights_only" not in captured.err
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--weights", str(path))) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, fragment)
    assert "weights_only" not in captured.err


@pytest.mark.parametrize("top", ["0", "-2"])
def test_predict_top_must_be_positive(top, trained_run, image_tree, capsys):
    image = next((image_tree / "red").iterdir())
    assert main(["predict", str(trained_run.out_dir / "best.pt"), str(image), "--top", top, "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr(), f"--top {top}")


def test_predict_reports_a_bad_file_and_predicts_the_good_ones(trained_run, image_tree, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = next((image_tree / "red").iterdir())
    assert main(["predict", str(trained_run.out_dir / "best.pt"), str(bad), str(good), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(str(good) + ": ")
    assert_one_line_error(captured, "bad.jpg")


def test_a_damaged_feature_cache_file_is_recomputed(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache")
    first = run(config, tmp_path / "a")
    (path,) = (tmp_path / "cache" / "features").glob("*.npy")
    raw = bytearray(path.read_bytes())
    raw[-64:] = bytes(64)  # same size, other activations
    path.write_bytes(bytes(raw))
    cache = FeatureCache(tmp_path / "cache" / "features")
    with pytest.warns(UserWarning, match="damaged"):
        second = run(config, tmp_path / "b", feature_cache=cache)
    assert cache.misses == 1 and second.history[0]["val_loss"] == first.history[0]["val_loss"]


def test_a_checkpoint_of_the_previous_format_still_evaluates(trained_run, image_tree, tmp_path):
    from transferlab.inference.evaluate import evaluate_checkpoint
    from transferlab.inference.predict import load_checkpoint

    old = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    old["format"] = "transferlab-checkpoint-1"
    for key in ("cut", "feature_dtype", "autocast", "metric", "val_loss", "data", "label_smoothing"):
        del old[key]
    torch.save(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt", "cpu")
    assert loaded.feature_dtype is None and loaded.info["metric"] == "val_accuracy"
    from transferlab.data.sources import load_image_folder

    data = load_image_folder(image_tree, tmp_path / "cache", progress=False)
    assert evaluate_checkpoint(tmp_path / "old.pt", data, device="cpu")["n"] == len(data)
    del old["resolution"]
    torch.save(old, tmp_path / "broken.pt")
    with pytest.raises(Exception, match="not a complete transferlab checkpoint"):
        load_checkpoint(tmp_path / "broken.pt", "cpu")


def test_accuracy_is_the_exact_fraction_correct():
    from transferlab.scoring.metrics import scores

    probs = torch.eye(3)[[0, 1, 2, 0, 0, 1, 2, 2, 1, 0] * 20]  # 200 images
    y = torch.tensor([0, 1, 2, 1, 0, 1, 2, 0, 1, 0] * 20)  # 8 of 10 right
    result = scores(probs.log()[None], y, ["a", "b", "c"], loss="ce", label_smoothing=0.0)
    assert result["accuracy"] == 160 / 200 == 0.8
