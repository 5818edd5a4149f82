"""A run folder: one run's results, never lost, never mixed with another's.

- state.pt resumes only the run it belongs to (same settings, data fingerprint and split); a folder holding another
  run's results is refused in one line naming the difference, and --overwrite starts over, removing the earlier
  results only when the new run writes its first epoch. Two processes never train in one folder at once.
- A finished run rerun with the same settings returns its result without training, also after a kill between the
  last epoch and the end.
- What cannot work is refused before training (exit 2, one line): one class, a non-finite number, official_test on a
  folder, record_epochs beyond epochs, cuda without CUDA, an --out or --cache-dir that is a file, unwritable, inside
  the data folder, a device, a pipe or another run's file; an output that is an input.
- A run whose loss stops being finite ends with one line (exit 1) and keeps no checkpoint from the bad epoch.
- The selection metric picks the best epoch, its checkpoint and the reported figures (val_loss: the lowest).
- A full disk is one line naming the path and the space needed, with no temporary file left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_one_line_error,
    make_image_tree,
    quiet,
    tiny_config,
    train_args,
)

from transferlab.cli import main
from transferlab.engine import loop
from transferlab.engine.rundir import LOCK, output_file
from transferlab.engine.train import run_training
from transferlab.errors import ConfigError, RunBusyError, RunFolderError
from transferlab.fsutil import claimed


def run(config, out, **kwargs):
    return run_training(config, out, log=quiet, **kwargs)


def stop_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return on_epoch


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


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


# ---------------------------------------------------------------------------- the selection metric
def test_val_loss_metric_picks_the_lowest_loss_epoch_and_its_checkpoint(image_tree, tmp_path):
    config = tiny_config(image_tree, tmp_path / "cache", epochs=4, lr=0.3, head="linear", metric="val_loss")
    result = run(config, tmp_path / "run")
    losses = [r["val_loss"] for r in result.history]
    assert result.best_epoch == 1 + int(np.argmin(losses))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["epoch"] == result.best_epoch and ckpt["metric"] == "val_loss"
    assert ckpt["val_loss"] == min(losses)
    assert result.at_epoch(2)["best_epoch"] == 1 + int(np.argmin(losses[:2]))


def test_a_cache_inside_the_data_folder_is_refused_before_it_is_created(tmp_path, capsys):
    data = make_image_tree(tmp_path / "data", per_class=12, size=16)
    assert main(train_args(data, tmp_path / "run", data / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "--cache-dir", "inside the data folder")
    assert sorted(p.name for p in data.iterdir()) == ["blue", "green", "red"]


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


# ---------------------------------------------------------------------------- full disks
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


def test_an_output_is_never_the_run_folders_lock_or_a_file_being_written(trained_run, image_tree, tmp_path, capsys):
    out = trained_run.out_dir
    assert (out / LOCK).is_file()  # left by the run that trained there, and taken by the next
    for name in (LOCK, ".metrics.json.tmp4242", ".best.pt.tmp7", "mlflow.db"):
        with pytest.raises(ConfigError, match=f"is a file of the run folder {out}: writing it would replace") as error:
            output_file(out / name, "-o", ConfigError)
        assert "\n" not in str(error.value)
    starting = tmp_path / "starting"  # a run in its first epoch: its .lock, no metrics.json yet
    with claimed(starting / LOCK):
        with pytest.raises(ConfigError, match="the lock that keeps two processes from training there"):
            output_file(starting / LOCK, "--output", ConfigError)
    best, image = str(out / "best.pt"), str(next((image_tree / "red").iterdir()))
    assert main(["export", best, "--format", "torchscript", "-o", str(out / LOCK)]) == 2
    assert_one_line_error(capsys.readouterr(), "-o", "a file of the run folder")
    assert main(["predict", best, image, "--output", str(out / LOCK)]) == 2
    assert_one_line_error(capsys.readouterr(), "--output", "a file of the run folder")
    assert (out / LOCK).read_bytes() == b""  # the lock is as the run left it
    for name in ("lock", ".notes.tmp1", ".metrics.json.tmpx"):  # no file of the run: written as asked
        assert output_file(out / name, "-o", ConfigError) == out / name


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
