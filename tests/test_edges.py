"""Trust at the edges: small, odd or reused data, files and settings never give a wrong number or lose a result.

The spec these tests hold transferlab to (each case failed before its fix):
- One file, two paths: an image reached twice (a symlink or hard link inside its class folder, a labels file naming
  it by another path) is one image: counted once, never in two parts of a split, and a warning says how many paths
  were dropped. The same file under two labels (or in two parts of a given split) is an error naming both.
- The storage transform: a checkpoint records the exact side its run stored every image at; evaluate and predict
  store any file at that side, so predict equals evaluate file by file on a folder of mixed sizes and shapes.
- evaluate recognises the run's images wherever they lie, pixel for pixel (the training and validation images'
  digests, recorded in the run folder): a moved copy gets the run's test split, `--split all` says it includes the
  training images, and other data says how many of the run's training and validation images it holds; the run's
  split is never applied to data it was not made from.
- Settings given in two places, one of which would silently win, are refused in one line: a variant key or [run]
  key beside a [grid] axis, `--set KEY=...` beside a grid axis, variant or searched option.
- Ties: an epoch or trial that ties on the metric is chosen by validation loss, then the lower cost; the choice
  says it was a tie. predict flags top classes it cannot tell apart.
- Lost results: `train --out` on a run of other settings is refused naming the difference (--overwrite replaces
  it); two processes never train in one folder; an output that is an input is refused; a full disk is one line
  naming the path and the space needed, with no temporary file left; an in-memory SQLite storage is refused; a
  waiting trial of an earlier spec is marked stale, not run.
- Tracebacks and secrets: a password in a storage URL's query is never shown or saved; a last batch of one image
  with BatchNorm trains (merged into the batch before); batch size 1 with a trainable BatchNorm is one line;
  --log mlflow with a file store, an unreachable database or a missing driver, a truncated CIFAR batches.meta and a
  checkpoint with a negative resolution are one line each; a study's missing-weights error gives the study's fix.
- Reports: the uncertainty they state is right for 1, 2 and 3 replicates and for folds (what the interval
  covers; no interval below 3); a test interval that reaches chance is a warning; a selection its own replicates
  cannot tell from another is called a coin flip; paths in "Use this model" are relative.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import CLASS_COLOURS, noise_image, quiet, tiny_config
from PIL import Image
from test_cli import assert_one_line_error, train_args
from test_study import load, write_spec

from transferlab import run_study
from transferlab.cli import main
from transferlab.config.run import RunConfig
from transferlab.config.study import StudySpec
from transferlab.data.sources import load_image_folder, load_images, read_labels_file, scan_image_folder
from transferlab.engine.run import batch_bounds
from transferlab.engine.train import run_training
from transferlab.errors import ConfigError, DataError, RunBusyError, WeightsError
from transferlab.fsutil import claimed
from transferlab.inference.checkpoint import Checkpoint
from transferlab.inference.evaluate import stored_as_trained
from transferlab.inference.predict import load_checkpoint, predict_files
from transferlab.report.data import StudyData
from transferlab.report.sections import selection_certainty
from transferlab.report.write import build_blocks, render_markdown
from transferlab.scoring.selection import best_trial, epoch_tie, improves
from transferlab.study import worker as worker_module
from transferlab.study.records import Selection, StudyRecord, TrialRecord
from transferlab.study.storage import resolve_url
from transferlab.urls import hide, password_of, redact, without_password


def markdown(data: StudyData, tmp_path: Path) -> str:
    return render_markdown(build_blocks(data), tmp_path)


# ---------------------------------------------------------------------------- one file, two paths
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_an_image_linked_inside_its_class_is_counted_once(link, make_tree, tmp_path):
    tree = make_tree("images", per_class=12, size=16)
    original = tree / "red" / "000.png"
    for i in range(3):  # three more paths to one image
        twin = tree / "red" / f"twin{i}.png"
        os.symlink(original, twin) if link == "symlink" else os.link(original, twin)
    with pytest.warns(UserWarning, match="3 paths reached an image already listed"):
        source = scan_image_folder(tree)
    assert source.duplicates == 3 and len(source.files) == 36
    assert len({os.path.realpath(path) for path, _ in source.files}) == 36
    config = tiny_config(tree, tmp_path / "cache")
    with pytest.warns(UserWarning, match="counted once"):
        result = run_training(config, tmp_path / "run", log=quiet)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert metrics["duplicates"] == 3 and metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 36


def test_a_labels_file_naming_one_image_twice_counts_it_once(make_tree, tmp_path):
    tree = make_tree("images", per_class=8, size=16)
    os.symlink(tree / "red" / "001.png", tree / "red" / "alias.png")
    rows = [f"images/{c}/{i:03d}.png,{c}" for c in ("red", "green", "blue") for i in range(8)]
    rows += ["./images/red/../red/001.png,red", "images/red/alias.png,red"]  # the same image by two more paths
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="2 paths reached an image already listed"):
        parsed = read_labels_file(table)
    assert parsed.duplicates == 2 and len(parsed.paths) == 24
    table.write_text("path,label\n" + "\n".join([*rows[:24], "images/red/alias.png,green"]) + "\n")
    with pytest.raises(DataError, match=r"row 26: images/red/alias.png is the image of row 3 with another label"):
        read_labels_file(table)


# ---------------------------------------------------------------------------- the storage transform
@pytest.fixture
def mixed_tree(tmp_path) -> Path:
    """Three classes of images of mixed sizes and aspect ratios (squares, landscapes, portraits)."""
    rng = np.random.default_rng(5)
    shapes = [(16, 16), (24, 24), (20, 40), (40, 20), (30, 30), (18, 27), (33, 22)]
    root = tmp_path / "mixed"
    for name in ("red", "green", "blue"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            h, w = shapes[i % len(shapes)]
            Image.fromarray(noise_image(CLASS_COLOURS[name], (h, w), rng)).save(root / name / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("policy", ["crop", "pad"])
def test_predict_equals_evaluate_file_by_file_on_mixed_sizes(mixed_tree, policy, tmp_path):
    config = tiny_config(mixed_tree, tmp_path / "cache", head="linear", lr=1e-2, resize_policy=policy)
    run_training(config, tmp_path / "run", log=quiet)
    ckpt = Checkpoint.load(tmp_path / "run" / "best.pt")
    stored = load_images(RunConfig.from_dict(ckpt.config))
    assert ckpt.stored_side == stored.stored_side  # the exact side the run stored its images at, recorded
    loaded = load_checkpoint(tmp_path / "run" / "best.pt", "cpu")
    data = stored_as_trained(loaded, RunConfig.from_dict({"progress": False}, base=RunConfig.from_dict(ckpt.config)))
    assert np.array_equal(data.images, stored.images)  # evaluate reads what training stored
    expected = loaded.probabilities(data.images)
    files = [path for path, _ in scan_image_folder(mixed_tree).files]
    predicted = predict_files(tmp_path / "run" / "best.pt", files, top=3, device="cpu")
    for row, probs in zip(predicted, expected, strict=True):
        order = probs.argsort(descending=True)[:3]
        assert [t["class"] for t in row["top"]] == [loaded.classes[j] for j in order], row["file"]
        assert [t["probability"] for t in row["top"]] == pytest.approx(probs[order].tolist(), abs=1e-5)


def test_a_checkpoint_from_before_the_stored_side_is_read_as_before(trained_run, tmp_path):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    raw["format"] = "transferlab-checkpoint-3"
    for key in ("stored_side", "calibration"):
        del raw[key]
    torch.save(raw, tmp_path / "old.pt")
    old = Checkpoint.load(tmp_path / "old.pt")
    assert (old.stored_side, old.calibration) == (None, None)


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


# ---------------------------------------------------------------------------- settings silently ignored
GRID_SPEC = """name = "s"
[run]
data = "cifar10"
{run}
[grid]
epochs = [1, 2]
{grid}
{variants}
"""


@pytest.mark.parametrize(
    "run, grid, variants, fragment",
    [
        ("epochs = 3", "", "", "[run] epochs and the [grid] axis epochs"),
        ("", 'variant = ["z"]', "[variants]\nz = { epochs = 3 }", "[variants.z] epochs and the [grid] axis epochs"),
    ],
)
def test_a_setting_the_grid_overrides_is_refused(run, grid, variants, fragment, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(GRID_SPEC.format(run=run, grid=grid, variants=variants))
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        StudySpec.load(path)


@pytest.mark.parametrize(
    "grid, variants, override, setter",
    [
        ("lr = [0.1, 0.2]", "", "lr=0.5", "the [grid] axis lr"),
        ('variant = ["a"]', "[variants]\na = { lr = 0.1 }", "lr=0.5", "[variants.a]"),
    ],
)
def test_set_beside_what_overrides_it_is_refused_in_one_line(grid, variants, override, setter, tmp_path, capsys):
    path = tmp_path / "spec.toml"
    path.write_text(GRID_SPEC.format(run="", grid=grid, variants=variants))
    assert main(["study", "run", str(path), "--dir", str(tmp_path / "out"), "--set", override]) == 2
    assert_one_line_error(capsys.readouterr(), f"--set {override}", setter, "ignored")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- ties
def test_an_accuracy_tie_between_epochs_goes_to_the_lower_validation_loss():
    rows = [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 0.9}, {"epoch": 5, "val_accuracy": 0.5, "val_loss": 0.0}]
    assert improves(rows[1], rows[0], "val_accuracy")
    tie = epoch_tie(rows, "val_accuracy")
    assert tie.tied == [1] and tie.broken_by == "val_loss"
    same = [{**rows[0]}, {**rows[0], "epoch": 2}]  # the same in every figure: the earlier, cheaper epoch
    assert not improves(same[1], same[0], "val_accuracy")
    assert epoch_tie(same, "val_accuracy").broken_by == "the earlier epoch"
    assert epoch_tie(rows[:1], "val_accuracy") is None
    by_loss = [{"epoch": 1, "val_accuracy": 0.4, "val_loss": 0.5}, {"epoch": 2, "val_accuracy": 0.6, "val_loss": 0.5}]
    assert epoch_tie(by_loss, "val_loss").broken_by == "val_accuracy" and best_row_epoch(by_loss, "val_loss") == 2


def best_row_epoch(rows, metric):
    best = None
    for row in rows:
        best = row if improves(row, best, metric) else best
    return best["epoch"]


def fake(number: int, value: float, loss: float, epochs: int):
    history = [{"epoch": e + 1} for e in range(epochs)]
    return SimpleNamespace(number=number, value=value, best={"val_loss": loss}, history=history)


def test_a_trial_tie_goes_to_the_lower_loss_then_fewer_epochs_then_the_lower_number():
    chosen, tie = best_trial([fake(0, 0.8, 0.9, 3), fake(1, 0.8, 0.4, 3), fake(2, 0.7, 0.1, 1)], "val_accuracy")
    assert chosen.number == 1 and tie.tied == [0] and tie.broken_by == "val_loss"
    chosen, tie = best_trial([fake(0, 0.8, 0.4, 5), fake(1, 0.8, 0.4, 2)], "val_accuracy")
    assert chosen.number == 1 and tie.broken_by == "fewer epochs"
    chosen, tie = best_trial([fake(3, 0.8, 0.4, 2), fake(1, 0.8, 0.4, 2)], "val_accuracy")
    assert chosen.number == 1 and tie.broken_by == "the lower trial number"
    chosen, tie = best_trial([fake(0, 0.9, 0.4, 2), fake(1, 0.8, 0.1, 2)], "val_accuracy")
    assert chosen.number == 0 and tie is None  # the metric decided: no tie to report
    chosen, tie = best_trial([fake(0, 0.3, 0.3, 2), fake(1, 0.2, 0.2, 2)], "val_loss")  # loss: lower wins
    assert chosen.number == 1 and tie is None


def test_predict_flags_classes_it_cannot_tell_apart(trained_run, image_tree, tmp_path, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    for key in [k for k in raw["model"] if k.startswith("fc.") or k.startswith("classifier.")]:
        raw["model"][key] = torch.zeros_like(raw["model"][key])  # every class scores the same
    torch.save(raw, tmp_path / "flat.pt")
    image = str(next((image_tree / "red").iterdir()))
    (result,) = predict_files(tmp_path / "flat.pt", [image], top=1, device="cpu")
    assert sorted(result["tie"]) == ["blue", "green", "red"]
    assert main(["predict", str(tmp_path / "flat.pt"), image]) == 0
    assert "(a tie: " in capsys.readouterr().out
    (result,) = predict_files(trained_run.out_dir / "best.pt", [image], top=1, device="cpu")
    assert "tie" not in result


# ---------------------------------------------------------------------------- lost results
def test_a_finished_run_with_other_settings_is_kept_unless_overwritten(image_tree, tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(train_args(image_tree, out, cache)) == 0
    before = {name: (out / name).read_bytes() for name in ("best.pt", "metrics.json", "config.json", "split.json")}
    capsys.readouterr()
    assert main(train_args(image_tree, out, cache, "--lr", "0.05")) == 2
    assert_one_line_error(capsys.readouterr(), str(out), "lr 0.001 there, 0.05 here", "--overwrite")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert main(train_args(image_tree, out, cache, "--lr", "0.05", "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["lr"] == 0.05
    assert main(train_args(image_tree, out, cache, "--lr", "0.05")) == 0  # the same settings: returned as finished
    assert "already finished" in capsys.readouterr().err


def test_two_processes_never_train_in_one_folder(image_tree, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with claimed(out / ".lock") as mine:  # held as another process's training holds it
        assert mine
        assert main(train_args(image_tree, out, tmp_path / "cache")) == 2
        assert_one_line_error(capsys.readouterr(), str(out), "another process is training")
        with pytest.raises(RunBusyError):
            run_training(tiny_config(image_tree, tmp_path / "cache"), out, log=quiet)
    assert not (out / "metrics.json").exists()
    assert main(train_args(image_tree, out, tmp_path / "cache")) == 0  # free again once the other ends


def test_an_output_that_is_an_input_is_refused(trained_run, image_tree, tmp_path, capsys):
    best = trained_run.out_dir / "best.pt"
    before = best.read_bytes()
    os.symlink(best, tmp_path / "alias.pt")
    for target in (best, tmp_path / "alias.pt"):
        assert main(["export", str(best), "--format", "torchscript", "-o", str(target)]) == 2
        assert_one_line_error(capsys.readouterr(), "is an input")
    assert best.read_bytes() == before
    image = next((image_tree / "red").iterdir())
    pixels = image.read_bytes()
    for output in (image, best):
        assert main(["predict", str(best), str(image_tree / "red"), "--output", str(output)]) == 2
        assert_one_line_error(capsys.readouterr(), "--output", "is an input")
    assert image.read_bytes() == pixels and best.read_bytes() == before


def test_an_in_memory_sqlite_storage_is_refused(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", {"epochs": [1]})
    for url in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out"), "--storage", url]) == 2
        assert_one_line_error(capsys.readouterr(), "in-memory SQLite", "name a file")
    assert not (tmp_path / "out").exists()


def test_a_waiting_trial_of_an_earlier_spec_is_marked_stale_not_run(make_tree, tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=12, size=16), tmp_path / "cache",
                      {"strategy": ["frozen", "full"], "epochs": [1]}, head="linear")  # fmt: skip
    real_training = worker_module.run_training

    def missing_weights(*args, **kwargs):  # the first spec's weights cannot be loaded
        raise WeightsError("weights file w.pth does not exist", "pass {any}")

    monkeypatch.setattr(worker_module, "run_training", missing_weights)
    with pytest.raises(WeightsError, match=r"--set weights="):  # the study's fix, not train's --weights
        run_study(spec, study_dir=tmp_path / "out", report=False)
    trained = []

    def counted(config, *args, **kwargs):
        trained.append(config.lr)
        return real_training(config, *args, **kwargs)

    monkeypatch.setattr(worker_module, "run_training", counted)
    run_study(spec, study_dir=tmp_path / "out", overrides=["lr=0.02"])  # the spec fixed: other identities
    assert trained == [0.02, 0.02]  # the earlier spec's waiting trial was not trained
    study = load(tmp_path / "out")
    stale = [t for t in study.get_trials(deepcopy=False) if "stale" in t.user_attrs]
    assert len(stale) == 1 and stale[0].state.name == "PRUNED"
    assert "1 trial queued by an earlier spec" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------------------- full disks
def no_space(monkeypatch, module: str = "transferlab.fsutil") -> None:
    monkeypatch.setattr(f"{module}.free_bytes", lambda path: 1024)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


def test_a_full_disk_for_the_run_state_is_one_line_and_leaves_no_temporary_file(image_tree, tmp_path, monkeypatch,
                                                                                capsys):  # fmt: skip
    import transferlab.fsutil as fsutil

    real = fsutil.require_space

    def starved(path, needed, what):  # the disk fills up just as state.pt is written
        if Path(path).name == "state.pt":
            monkeypatch.setattr(fsutil, "free_bytes", lambda folder: 1024)
        return real(path, needed, what)

    monkeypatch.setattr(fsutil, "require_space", starved)
    out = tmp_path / "run"
    assert main(train_args(image_tree, out, tmp_path / "cache")) == 1
    err = capsys.readouterr().err  # the run's own lines, then the error: one line, no traceback
    assert "Traceback" not in err and err.splitlines()[-1].startswith("transferlab: error: no space left for resume")
    assert str(out / "state.pt") in err.splitlines()[-1] and "MB, 1.0 KB free" in err
    assert leftovers(out) == [] and not (out / "state.pt").exists()
    assert json.loads((out / "metrics.json").read_text())["history"]  # the epoch before it is kept


def test_a_write_that_runs_out_of_space_midway_is_one_line(tmp_path, monkeypatch):
    import transferlab.fsutil as fsutil

    class Full:  # a file that takes a few bytes, then the disk is full
        def __init__(self, path, mode):
            self.handle = open(path, mode)  # noqa: SIM115

        def write(self, data):
            self.handle.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(fsutil, "open", Full, raising=False)  # the module's open, not the builtin everyone uses
    target = tmp_path / "file.json"
    with pytest.raises(fsutil.OutputError, match=r"no space left for run config .*file.json: it needs"):
        fsutil.atomic_write_json({"a": 1}, target, "run config")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_for_the_decode_cache_is_a_warning_and_no_memory_map(make_tree, tmp_path, monkeypatch):
    tree = make_tree("images", per_class=12, size=16)
    no_space(monkeypatch, "transferlab.data.decode")
    with pytest.warns(UserWarning, match="no space for the decode cache .* needs .* MB free"):
        images = load_image_folder(tree, tmp_path / "cache", progress=False)
    assert not isinstance(images.images, np.memmap) and len(images) == 36
    assert not list((tmp_path / "cache" / "decoded").glob("*"))  # neither a cache nor a temporary folder


def test_a_full_disk_for_the_feature_cache_is_a_warning(image_tree, tmp_path, monkeypatch):
    real_save = np.save

    def full(path, array, *args, **kwargs):
        if "features" not in str(path):
            return real_save(path, array, *args, **kwargs)
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    config = tiny_config(image_tree, tmp_path / "cache", strategy="partial", cache_features="auto")
    with pytest.warns(UserWarning, match="kept in memory only"):
        run_training(config, tmp_path / "run", log=quiet)
    assert leftovers(tmp_path / "cache") == []


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (root on Linux); the test is skipped where none can be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small filesystem to fill ({done.stderr.decode().strip() or 'not permitted'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.slow
def test_a_really_full_disk_never_kills_decoding_with_sigbus(make_tree, tmp_path):
    """The decode cache on a filesystem too small for it: a memory map of it would die of SIGBUS writing a page.
    In its own process, so a crash is a failed test, not a dead suite."""
    tree = make_tree("images", per_class=20, size=64)  # 60 x 64 x 64 x 3: 737 KB decoded
    with small_filesystem(tmp_path / "small", "256k") as small:
        args = train_args(tree, tmp_path / "run", small / "cache", "--resolution", "64")
        done = subprocess.run([sys.executable, "-m", "transferlab", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "no space for the decode cache" in done.stderr and "Traceback" not in done.stderr
        assert leftovers(small) == []


@pytest.mark.slow
def test_a_really_full_disk_for_the_study_storage_is_one_line_and_a_rerun_finishes(make_tree, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=12, size=16), tmp_path / "cache",
                      {"epochs": [1]}, head="linear")  # fmt: skip
    with small_filesystem(tmp_path / "small", "4m") as small:
        url = f"sqlite:///{small / 'study.db'}"
        args = ["study", "run", str(spec), "--dir", str(tmp_path / "out"), "--storage", url, "--no-report"]
        assert main(args) == 0
        filler = small / "filler"
        with open(filler, "wb") as handle:  # the disk fills up between two runs
            with contextlib.suppress(OSError):
                handle.write(b"\0" * (8 << 20))
        capsys.readouterr()
        assert main([*args, "--set", "grid.epochs=[1, 2]"]) == 2
        assert_one_line_error(capsys.readouterr(), "full", "MB free")
        filler.unlink()
        assert main([*args, "--set", "grid.epochs=[1, 2]"]) == 0  # nothing was lost: the study goes on


# ---------------------------------------------------------------------------- secrets
@pytest.mark.parametrize(
    "url, secret, password",
    [
        ("postgresql+psycopg2://u@127.0.0.1:1/db?password=Sekr3t%40x", "Sekr3t@x", "Sekr3t@x"),
        ("postgresql+psycopg2://u@127.0.0.1:1/db?sslmode=disable&PASSWORD=Sekr3t", "Sekr3t", "Sekr3t"),
        ("postgresql+psycopg2://u@127.0.0.1:1/db?sslpassword=Sekr3t", "Sekr3t", None),
        ("mysql+pymysql://u@127.0.0.1:1/db?passwd=Sekr3t", "Sekr3t", "Sekr3t"),
        ("postgresql+psycopg2://u:Sekr3t@127.0.0.1:1/db?token=Sekr3t", "Sekr3t", "Sekr3t"),
    ],
)
def test_a_credential_in_a_url_query_is_never_shown_or_saved(url, secret, password):
    for text in (redact(url), without_password(url), hide(f"--storage {url} and {secret}", url)):
        assert secret not in text and "Sekr3t" not in text and "Sekr3t%40x" not in text
    assert "***" in redact(url) and "127.0.0.1:1/db" in redact(url) and "127.0.0.1:1/db" in without_password(url)
    assert password_of(url) == password  # handed to worker processes through the environment, never argv


def test_a_query_password_stays_out_of_the_error_and_storage_txt(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", {"epochs": [1]})
    url = "postgresql+psycopg2://someone@127.0.0.1:1/db?password=Sekr3t&connect_timeout=2"
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out"), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "Sekr3t" not in err and "password=***" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "storage.txt").exists()


def test_resolve_url_keeps_a_query_password_as_the_password():
    url = resolve_url(Path("/tmp"), "postgresql+psycopg2://u@h/db?password=p1", password_env=None)
    assert password_of(url) == "p1"


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


def test_a_study_point_with_a_last_batch_of_one_completes(make_tree, tmp_path):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=15, size=16), tmp_path / "cache",
                      {"batch_size": [13], "epochs": [1]}, head="mlp")  # fmt: skip
    run_study(spec, study_dir=tmp_path / "out", report=False)
    assert load(tmp_path / "out").user_attrs["selected"]["trial"] == 0


@pytest.mark.parametrize(
    "uri, fragments",
    [
        ("file:///{tmp}/mlruns", ["file store"]),
        ("{tmp}/mlruns", ["file store"]),
        ("postgresql+psycopg2://u:Sekr3t@127.0.0.1:1/db", ["does not answer", "u:***@"]),
        ("mysql://u@127.0.0.1:1/db", ["driver", "not installed"]),
    ],
)
def test_mlflow_tracking_stores_that_cannot_work_are_one_line(uri, fragments, image_tree, tmp_path, monkeypatch,
                                                              capsys):  # fmt: skip
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--log", "mlflow")) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, "--log mlflow", *fragments)
    assert "Sekr3t" not in captured.err and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "not a dict", "no label_names"])
def test_a_damaged_cifar_batches_meta_is_one_line(damage, tmp_path, capsys):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    meta = pickle.dumps({"label_names": ["a", "b"]})
    content = {"truncated": meta[: len(meta) // 2], "not a dict": pickle.dumps([1, 2]),
               "no label_names": pickle.dumps({"names": []})}[damage]  # fmt: skip
    (folder / "batches.meta").write_bytes(content)
    args = ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--no-download", "--out",
            str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--weights", "none"]  # fmt: skip
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "batches.meta")


@pytest.mark.parametrize("field, value", [("resolution", -32), ("resolution", 0), ("cut", -1), ("stored_side", 0)])
def test_a_checkpoint_with_an_impossible_value_is_one_line(field, value, trained_run, image_tree, tmp_path, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    raw[field] = value
    torch.save(raw, tmp_path / "bad.pt")
    for args in (["predict", str(tmp_path / "bad.pt"), str(image_tree / "red")],
                 ["evaluate", str(tmp_path / "bad.pt"), "--data", str(image_tree)],
                 ["export", str(tmp_path / "bad.pt"), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]):  # fmt: skip
        assert main(args) == 2
        assert_one_line_error(capsys.readouterr(), field, str(value))


def test_a_studys_missing_weights_advice_is_the_studys(make_tree, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=12, size=16), tmp_path / "cache",
                      {"epochs": [1]}, weights=str(tmp_path / "missing.pth"))  # fmt: skip
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, "missing.pth", "--set weights=", "in [run]")
    assert "pass --weights" not in captured.err
    error = WeightsError("ImageNet weights for x are not in y", "pass {path} to a local state dict, or {none}")
    assert "pass --weights PATH" in str(error) and "--set weights=PATH" in str(error.for_study())


# ---------------------------------------------------------------------------- the report's statements
def trial(number: int, strategy: str, accuracy: float, seed: int | None = None, n_val: int = 200) -> dict:
    row = {"epoch": 1, "seconds": 1.0, "val_accuracy": accuracy, "train_accuracy": accuracy, "val_loss": 1 - accuracy,
           "train_loss": 1 - accuracy}  # fmt: skip
    point = {"strategy": strategy, "epochs": 1, **({"seed": seed} if seed is not None else {})}
    return {"number": number, "kind": "run", "key": f"t{number}", "point": point, "history": [row], "best": row,
            "wall_seconds": 1.0, "config": {"batch_size": 8, "loss": "ce", "data": "cifar10", **point},
            "input_path": "images", "run_dir": "", "checkpoint": "", "source_trial": None, "setup_seconds": 0.1,
            "feature_seconds": 0.0, "n_val": n_val, "n_train": 800, "identity": f"id{number}"}  # fmt: skip


def selected(t, *, n_test: int = 2000, correct: int = 1500, counts=None, configuration=None) -> Selection:
    t = t if isinstance(t, dict) else dataclasses.asdict(t)
    classes = ["a", "b"]
    counts = counts or {"train": {"a": 400, "b": 400}, "val": {"a": 100, "b": 100},
                        "test": {"a": n_test // 2, "b": n_test - n_test // 2}}  # fmt: skip
    record = {"trial": t["number"], "key": t["key"], "identity": t["identity"], "point": t["point"],
              "val_accuracy": t["best"]["val_accuracy"], "val_loss": t["best"]["val_loss"], "metric": "val_accuracy",
              "n_val": t["n_val"], "test_accuracy": correct / n_test, "n_test": n_test, "test_loss": 0.5,
              "per_class_accuracy": {"a": 0.5, "b": 0.5}, "confusion_matrix": [[1, 1], [1, 1]], "classes": classes,
              "class_counts": counts, "tie": None}  # fmt: skip
    if configuration:
        record["configuration"] = configuration
    return Selection(**record)


def study(trials: list[dict], grid: dict, test: dict) -> StudyData:
    """A study's report data built by hand: trials and selection as the records the storage holds."""
    return StudyData("hand", {"name": "hand", "grid": grid}, "transferlab study run x.toml",
                     [TrialRecord(**t) for t in trials], grid, test, 1, {})  # fmt: skip


def test_a_test_interval_that_reaches_chance_is_a_warning(tmp_path):
    t = trial(0, "frozen", 0.6)
    weak = study([t], {"strategy": ["frozen"], "epochs": [1]}, selected(t, n_test=20, correct=12))
    text = markdown(weak, tmp_path)
    assert "Warning: the test accuracy's 95% interval" in text and "reaches down to chance, 50%" in text
    assert "too few to tell models a few points apart" in text
    strong = study([t], {"strategy": ["frozen"], "epochs": [1]}, selected(t, n_test=2000, correct=1500))
    assert "Warning" not in markdown(strong, tmp_path)
    imbalanced = selected(t, n_test=100, correct=85, counts={"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1},
                                                              "test": {"a": 90, "b": 10}})  # fmt: skip
    assert "chance, 90%" in markdown(study([t], {"strategy": ["frozen"], "epochs": [1]}, imbalanced), tmp_path)


def test_no_digit_finer_than_the_interval_anywhere(tmp_path):
    tiny = trial(0, "frozen", 1.0, n_val=2)
    text = markdown(study([tiny], {"strategy": ["frozen"], "epochs": [1]}, selected(tiny, n_test=2, correct=2)),
                    tmp_path)  # fmt: skip
    assert "100.00%" not in text and "| validation accuracy (best epoch) | 100% |" in text
    assert "| frozen | 100% |" in text and "test accuracy 100% (95% CI 34-100)" in text  # 2 of 2: ± 66 points
    two_hundred = trial(0, "frozen", 0.625, n_val=200)
    text = markdown(study([two_hundred], {"strategy": ["frozen"], "epochs": [1]}, selected(two_hundred)), tmp_path)
    assert "62.50%" not in text and "62.5%" not in text and "| frozen | 62% |" in text  # ± 7 points: whole points


def replicated(values: dict[str, list[float]], axis: str = "seed") -> StudyData:
    trials, number = [], 0
    for strategy, accuracies in values.items():
        for seed, accuracy in enumerate(accuracies):
            t = trial(number, strategy, accuracy)
            t["point"] = {"strategy": strategy, "epochs": 1, axis: seed}
            trials.append(t)
            number += 1
    n = len(next(iter(values.values())))
    grid = {"strategy": list(values), "epochs": [1], axis: list(range(n))}
    best = max(values, key=lambda s: sum(values[s]))
    chosen = next(t for t in trials if t["point"]["strategy"] == best)
    configuration = {"key": f"epochs=1,strategy={best}", "replicate_axes": [axis], "mean": 0.0,
                     "trials": [t["number"] for t in trials if t["point"]["strategy"] == best]}  # fmt: skip
    return study(trials, grid, selected(chosen, configuration=configuration))


def test_uncertainty_statements_for_one_two_and_three_replicates_and_folds(tmp_path):
    one = study([trial(0, "frozen", 0.6), trial(1, "full", 0.7)], {"strategy": ["frozen", "full"], "epochs": [1]},
                None)  # fmt: skip
    one.test = selected(one.trials[1])
    assert "Each configuration ran once" in selection_certainty(one)
    # two seeds whose differences agree exactly: no "± 0", no interval, a coin flip
    two = replicated({"frozen": [0.5, 0.6], "full": [0.6, 0.7]})
    text = markdown(two, tmp_path)
    assert "± 0.0 " not in text and "cannot be measured from 2 replicates" in text
    assert "coin flip" in selection_certainty(two) and "seeds on one fixed split" in text
    # three seeds, clearly apart: an interval, measurable, no coin flip
    three = replicated({"frozen": [0.50, 0.52, 0.51], "full": [0.70, 0.71, 0.72]})
    text = markdown(three, tmp_path)
    assert "full beats frozen by" in text and "coin flip" not in selection_certainty(three)
    # three seeds within each other's noise: the table says so and the selection says it was a coin flip
    close = replicated({"frozen": [0.50, 0.70, 0.60], "full": [0.62, 0.58, 0.63]})
    assert "no measurable difference" in markdown(close, tmp_path) and "coin flip" in selection_certainty(close)
    folds = replicated({"frozen": [0.50, 0.52, 0.51], "full": [0.70, 0.71, 0.72]}, axis="fold")
    text = markdown(folds, tmp_path)
    assert "cross-validation folds" in text and "seeds on one fixed split" not in text


def test_a_tied_selection_says_so(tmp_path):
    a, b = trial(0, "frozen", 0.6), trial(1, "full", 0.6)
    record = selected(a)
    record.tie = {"tied": [1], "broken_by": "val_loss"}
    text = markdown(study([a, b], {"strategy": ["frozen", "full"], "epochs": [1]}, record), tmp_path)
    assert "The selection was a tie on val_accuracy with trials 1, broken by val_loss." in text


def test_use_this_model_shows_no_absolute_path_of_this_machine(tmp_path):
    t = trial(0, "frozen", 0.6)
    t["checkpoint"] = "trials/x/best.pt"
    t["config"]["data"] = "../shared/images"
    data = study([t], {"strategy": ["frozen"], "epochs": [1]}, selected(t))
    data.directory = tmp_path / "project" / "studies-out" / "s"
    data.record = StudyRecord(cwd=str(tmp_path / "project"))
    box = markdown(data, tmp_path).split("### Use this model")[1].split("\n## ")[0]
    assert str(tmp_path) not in box
    assert "transferlab predict trials/x/best.pt images/" in box
    assert "--data ../../../shared/images" in box  # the spec's path, seen from the study directory


# ---------------------------------------------------------------------------- found by a hostile tester
def test_an_output_is_never_a_device_a_pipe_or_another_runs_file(trained_run, image_tree, tmp_path, capsys):
    best, image = str(trained_run.out_dir / "best.pt"), str(next((image_tree / "red").iterdir()))
    os.mkfifo(tmp_path / "pipe")
    for target, fragment in ((tmp_path / "pipe", "not a regular file"), ("/dev/null", "not a regular file"),
                             (trained_run.out_dir / "metrics.json", "a file of the run folder")):  # fmt: skip
        assert main(["predict", best, image, "--output", str(target)]) == 2
        assert_one_line_error(capsys.readouterr(), fragment)
        assert main(["export", best, "--format", "torchscript", "-o", str(target)]) == 2
        assert_one_line_error(capsys.readouterr(), fragment)
    assert Path("/dev/null").is_char_device() and (tmp_path / "pipe").is_fifo()
    (tmp_path / "real.csv").write_text("old\n")
    os.symlink(tmp_path / "real.csv", tmp_path / "link.csv")
    assert main(["predict", best, image, "--output", str(tmp_path / "link.csv"), "--format", "csv"]) == 0
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "real.csv").read_text().startswith("file,")


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


def test_a_foreign_folder_is_not_taken_over_and_one_data_spelt_twice_is_one_run(image_tree, tmp_path, capsys,
                                                                                monkeypatch):  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"name": "my-app"}')
    assert main(train_args(image_tree, project, tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "files of no transferlab run (config.json)", "--overwrite")
    assert json.loads((project / "config.json").read_text()) == {"name": "my-app"}
    link = tmp_path / "alias"
    shutil.copytree(image_tree, tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_args(tmp_path / "data", out, tmp_path / "cache")) == 0
    monkeypatch.chdir(tmp_path)
    assert main(train_args("./data/../data", out, tmp_path / "cache")) == 0  # the same folder, spelt otherwise
    assert "already finished" in capsys.readouterr().err
    del link


@pytest.mark.parametrize(
    "field, value",
    [
        ("resolution", 10**9),
        ("stored_side", 10**9),
        ("feature_dtype", "float8"),
        ("autocast", "x"),
        ("dropout", float("nan")),
        ("mean", [0.5, 0.5, float("nan")]),
        ("temperature", 1e-300),
        ("temperature", 1e300),
        ("classes", ["blue", "blue", "red"]),
        ("tta_flip", "yes"),
    ],  # fmt: skip
)
def test_a_checkpoint_edited_to_nonsense_is_refused(field, value, trained_run, image_tree, tmp_path, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    raw[field] = value
    torch.save(raw, tmp_path / "bad.pt")
    for args in (["predict", str(tmp_path / "bad.pt"), str(image_tree / "red")],
                 ["export", str(tmp_path / "bad.pt"), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]):  # fmt: skip
        assert main(args) == 2
        assert_one_line_error(capsys.readouterr(), field)


def test_an_unreachable_mlflow_server_is_one_line(image_tree, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--log", "mlflow")) == 2
    assert_one_line_error(capsys.readouterr(), "--log mlflow", "does not answer")


def test_no_percentage_reads_100_or_0_when_it_is_not():
    from transferlab.scoring.stats import percent, percent_with_interval

    assert percent(99999, 100000) == "99.999%" and percent_with_interval(99999, 100000).startswith("99.999% ")
    assert percent(1, 100000) == "0.001%" and percent(2, 2) == "100%" and percent(0, 7) == "0%"


@pytest.mark.parametrize(
    "extra, override, fix",
    [
        ('variant = ["a"]', "[variants]\na = { lr = 0.1 }", "--set variants.a.lr=..."),
        ("", "[search]\nn_trials = 1\n[search.space]\nlr = [0.1, 0.2]", "--set search.space.lr=..."),
    ],
)
def test_set_refusals_suggest_a_fix_that_works(extra, override, fix, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(GRID_SPEC.format(run="", grid=extra, variants=override))
    with pytest.raises(ConfigError, match=re.escape(fix)):
        StudySpec.load(path, ["lr=0.5"])


def test_an_interrupt_before_a_run_starts_is_one_line(monkeypatch, capsys):
    import transferlab.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "transferlab: interrupted\n"


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


def test_database_urls_name_a_missing_driver_and_hide_odd_passwords(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", {"epochs": [1]})
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "o"), "--storage", "postgresql://u@127.0.0.1:1/d"])
    captured = capsys.readouterr()
    assert_one_line_error(captured, "driver psycopg is not installed", "postgresql+psycopg2://")
    for url in (
        "postgresql+psycopg2://u@h:1/db?options=-c%20password%3DSekr3t",
        "postgresql+psycopg2://u@h:1/db;password=Sekr3t",
    ):
        assert "Sekr3t" not in redact(url) and "Sekr3t" not in without_password(url)
        assert "Sekr3t" not in hide(f"error in {url}", url)


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


def test_torchscript_export_says_nothing_it_need_not(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run.out_dir / "best.pt"), "--format", "torchscript", "-o",
                 str(tmp_path / "m.pt")]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().err
