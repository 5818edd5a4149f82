"""The command line: train / evaluate / predict / models, help everywhere, one-line errors with exit code 2."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CLASS_COLOURS,
    assert_one_line_error,
    noise_image,
    train_args,
)
from PIL import Image

from transferlab.cli import main
from transferlab.config.run import RunConfig

SUBCOMMANDS = [
    [],
    ["train"],
    ["lr-find"],
    ["evaluate"],
    ["analyze"],
    ["predict"],
    ["models"],
    ["study"],
    ["study", "run"],
    ["study", "worker"],
    ["study", "report"],
]


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(11)
    files = []
    for name in ("red", "green"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(noise_image(CLASS_COLOURS[name], 24, rng)).save(path)
        files.append(str(path))
    return files


# ---------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: transferlab" in capsys.readouterr().out


def test_train_help_lists_every_run_option(capsys):

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in out
    assert "TRANSFERLAB_WEIGHTS" in out


def test_models(capsys):
    assert main(["models"]) == 0
    assert "squeezenet1_1: groups stem, fire2" in capsys.readouterr().out


# ---------------------------------------------------------------------------- train / evaluate / predict
def test_train_writes_the_run_directory(image_tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(image_tree, out, tmp_path / "cache", "--set", "lr=0.01", "--strategy", "partial")) == 0
    stdout = capsys.readouterr().out
    assert "best epoch 1" in stdout and str(out / "best.pt") in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and (out / "best.pt").is_file()
    assert (
        metrics["config"]["lr"] == 0.01
        and metrics["config"]["strategy"] == "partial"
        and metrics["config"]["progress"] is False
    )


def test_train_reads_a_toml_config_and_flags_override_it(image_tree, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nlr = 0.02\nhead = "linear"\nepochs = 5\n')
    out = tmp_path / "run"
    assert main(train_args(image_tree, out, tmp_path / "cache", "--config", str(toml))) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["head"], config["epochs"]) == (0.02, "linear", 1)


def test_evaluate_json_on_an_unseen_tree(trained_run, make_tree, capsys):
    root = make_tree("unseen", classes=("green", "red"), per_class=4, size=16, seed=3)
    assert (
        main(["evaluate", str(trained_run.out_dir / "best.pt"), "--data", str(root), "--json", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    assert set(result["per_class_accuracy"]) == {"blue", "green", "red"}


def test_evaluate_a_split_of_the_training_data(trained_run, image_tree, capsys):
    best = str(trained_run.out_dir / "best.pt")
    assert main(["evaluate", best, "--data", str(image_tree), "--split", "val", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = trained_run.history[trained_run.best_epoch - 1]
    assert result["n"] == 9 and result["accuracy"] == pytest.approx(row["val_accuracy"])


def test_predict(trained_run, image_files, capsys):
    best = str(trained_run.out_dir / "best.pt")
    assert main(["predict", best, *image_files, "--top", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == image_files
    assert all(len(line.split(": ", 1)[1].split(", ")) == 2 for line in lines)
    assert main(["predict", best, image_files[0], "--json", "--device", "cpu"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["top"]) == 3 and sum(t["probability"] for t in result["top"]) <= 1 + 1e-6


# ---------------------------------------------------------------------------- errors
def test_config_typo(image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--set", "epochz=3")) == 2
    assert_one_line_error(capsys.readouterr(), "epochz", "did you mean 'epochs'")


def test_bad_set_value(image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--set", "resolution=2")) == 2
    assert_one_line_error(capsys.readouterr(), "resolution", ">= 8")


def test_missing_data_path(tmp_path, capsys):
    assert main(train_args(tmp_path / "nowhere", tmp_path / "run", tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), str(tmp_path / "nowhere"), "does not exist")


def test_missing_weights_file(image_tree, tmp_path, capsys):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache")
    args[args.index("--weights") + 1] = str(tmp_path / "absent.pth")
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "absent.pth", "does not exist")


def test_missing_config_file(image_tree, tmp_path, capsys):
    assert (
        main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--config", str(tmp_path / "none.toml"))) == 2
    )
    assert_one_line_error(capsys.readouterr(), "none.toml")


def test_bad_checkpoint(tmp_path, image_tree, capsys):
    (tmp_path / "x.pt").write_text("not a checkpoint")
    assert main(["evaluate", str(tmp_path / "x.pt"), "--data", str(image_tree), "--json"]) == 2
    assert_one_line_error(capsys.readouterr(), "x.pt")
    assert main(["predict", str(tmp_path / "absent.pt"), str(tmp_path / "x.pt")]) == 2
    assert_one_line_error(capsys.readouterr(), "absent.pt")


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", "x", "--strategy", "half"])
    assert exit_info.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err


def test_interrupt_exits_130(monkeypatch, image_tree, tmp_path, capsys):
    import importlib

    train_module = importlib.import_module("transferlab.engine.train")

    def interrupted(config, out, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache")) == 130
    assert "run the same command to resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the installed command
def test_console_script(trained_run, image_files, tmp_path):
    script = Path(sys.executable).with_name("transferlab")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "transferlab.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}

    done = subprocess.run(
        [*command, "predict", str(trained_run.out_dir / "best.pt"), *image_files, "--json", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warnings, no progress noise
    assert [r["file"] for r in json.loads(done.stdout)] == image_files

    done = subprocess.run(
        [*command, "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "epochz=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["transferlab: error: unknown key 'epochz' (did you mean 'epochs'?)"]


# ---------------------------------------------------------------------------- CIFAR-10 checkpoints
@pytest.fixture
def cifar_run(tmp_path):
    """A run on a fake local CIFAR-10 (official test split) whose data_dir is only in the checkpoint."""
    from helpers import write_fake_cifar

    from transferlab import RunConfig, train

    write_fake_cifar(tmp_path / "data", per_batch=10, test=20)
    config = RunConfig.from_dict(
        {
            "data": "cifar10",
            "data_dir": str(tmp_path / "data"),
            "download": False,
            "official_test": True,
            "weights": "none",
            "epochs": 1,
            "batch_size": 25,
            "val_fraction": 0.2,
            "device": "cpu",
            "cache_dir": str(tmp_path / "cache"),
            "progress": False,
        }
    )
    train(config, tmp_path / "run", log=lambda text: None)
    return tmp_path / "run" / "best.pt"


def test_evaluate_cifar10_uses_the_runs_data_dir(cifar_run, capsys):
    # the run's own data: the default is its test split (here the official test batch), never the training images
    assert main(["evaluate", str(cifar_run), "--data", "cifar10", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 20 and result["split"] == "test"
    assert main(["evaluate", str(cifar_run), "--data", "cifar10", "--split", "all", "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 50 and "trained on" in captured.err


def test_evaluate_official_test_split(cifar_run, capsys):
    assert main(["evaluate", str(cifar_run), "--data", "cifar10", "--split", "test", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 20  # the official test batch, not an empty carved split
    assert main(["evaluate", str(cifar_run), "--data", "cifar10", "--split", "val", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10


def test_imagenet_weights_offline(image_tree, tmp_path, monkeypatch, capsys):
    from urllib.error import URLError

    def no_network(*args, **kwargs):
        raise URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache")
    args[args.index("--weights") + 1] = "imagenet"
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "--weights PATH", "TRANSFERLAB_WEIGHTS")


# ---------------------------------------------------------------------------- found by a hostile tester
def test_an_interrupt_before_a_run_starts_is_one_line(monkeypatch, capsys):
    import transferlab.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "transferlab: interrupted\n"


def test_train_without_data_says_how_to_name_it_and_downloads_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train_args("x", tmp_path / "run", tmp_path / "cache")
    del args[1:3]  # no --data
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "no data", "--data photos/", "--labels", "--data cifar10")
    assert main(["lr-find", "--weights", "none", "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr(), "no data")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no cache, no download


def test_timm_style_aliases_set_the_same_options(tmp_path):
    from transferlab.cli import _run_config, build_parser

    common = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    timm = ["--model", "resnet18", "--img-size", "64", "--opt", "adamw", "--sched", "cosine", "--smoothing", "0.1",
            "-b", "16"]  # fmt: skip
    ours = ["--arch", "resnet18", "--resolution", "64", "--optimizer", "adamw", "--schedule", "cosine",
            "--label-smoothing", "0.1", "--batch-size", "16"]  # fmt: skip
    via_timm = _run_config(build_parser().parse_args(common + timm))
    assert via_timm == _run_config(build_parser().parse_args(common + ours))
    assert (via_timm.arch, via_timm.resolution, via_timm.batch_size) == ("resnet18", 64, 16)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "--data", "d", "--out", "o", "--lrr", "0.1"], ["unrecognized arguments: --lrr 0.1", "--lr?"]),
        (["train", "--data", "d", "--out", "o", "--batchsize", "8"], ["--batch-size?"]),
        (["study", "run", "s.toml", "--worksers", "2"], ["--workers?"]),
        (["predict", "best.pt", "x.png", "--topp", "3"], ["--top?"]),
    ],
)
def test_a_misspelt_flag_names_the_closest_one(argv, fragments, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert_one_line_error(capsys.readouterr(), *fragments)


@pytest.mark.parametrize("arch, meant", [("resnet-18", "resnet18"), ("SqueezeNet1_1", "squeezenet1_1"),
                                         ("squeezenet_1_1", "squeezenet1_1"), ("resnet52", "resnet50")])  # fmt: skip
def test_a_misspelt_architecture_names_the_registered_one(arch, meant, image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--arch", arch)) == 2
    assert_one_line_error(capsys.readouterr(), f"unknown architecture {arch!r} (did you mean {meant!r}?)")
    assert not (tmp_path / "run").exists()


def test_a_photo_run_defaults_to_the_backbones_pretrained_input_size(image_tree, tmp_path, capsys):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache")
    at = args.index("--resolution")
    del args[at : at + 2]  # as a user types it: no --resolution
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["resolution"], config["crop_fraction"], config["dropout"]) == (224, 1.0, 0.5)


def test_off_a_terminal_a_run_prints_a_line_per_epoch_and_no_bars(image_tree, tmp_path):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--epochs", "3")
    args.remove("--no-progress")  # progress on, as by default: off a terminal it must not draw
    done = subprocess.run([sys.executable, "-m", "transferlab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80"}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["epoch", "train", "loss"])
    rows = lines[header + 1 : header + 4]
    assert [int(row.split()[0]) for row in rows] == [1, 2, 3]
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    for row, recorded in zip(rows, history):
        assert f"{recorded['val_loss']:.4f}" in row and f"{recorded['train_loss']:.4f}" in row
    best = json.loads((tmp_path / "run" / "metrics.json").read_text())["best_epoch"]
    assert rows[best - 1].endswith("best")
    assert all(len(line) <= 80 for line in [lines[header], *rows])
    assert not any(mark in done.stderr for mark in ("━", "eta", "\r"))


def test_evaluate_prints_within_80_columns(trained_run, capsys):
    assert main(["evaluate", str(trained_run.out_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "95% CI" in out
    figures = [line for line in out.splitlines() if not line.startswith("note: ")]  # a note is prose, a line of its own
    assert figures and max(len(line) for line in figures) <= 80


# ---------------------------------------------------------------------------- flags spelt out, a reader gone
@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "--data", "d", "--out", "o", "--epoch", "3"], ["unrecognized arguments: --epoch 3", "--epochs?"]),
        (["evaluate", "run", "--spl", "all"], ["unrecognized arguments: --spl all", "--split?"]),
        (["train", "--data", "d", "--out", "o", "--tta"], ["unrecognized arguments: --tta", "--tta-flip?"]),
    ],
)
def test_a_flag_is_never_taken_for_a_longer_one_it_begins(argv, fragments, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert_one_line_error(capsys.readouterr(), *fragments)


def test_a_reader_gone_before_anything_is_written_stops_quietly(trained_run):
    """`transferlab evaluate RUN | head -1` where head has gone: exit 141 (as a process killed by SIGPIPE), no
    traceback, no "Exception ignored" at the interpreter's exit."""
    reader = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "evaluate", str(trained_run.out_dir),
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    reader.stdout.close()  # the reader has gone before the first line
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "Broken pipe" not in err, err


def test_a_reader_gone_during_the_table_is_the_same_quiet_stop(trained_run, monkeypatch):
    """The table too (rich's own broken-pipe handling would exit 1): the reader goes after the first two lines."""

    class GoneAfterTwoLines(io.StringIO):
        def write(self, text):
            if text and self.getvalue().count("\n") >= 2:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

        def fileno(self):
            return descriptor

    descriptor = os.open(os.devnull, os.O_WRONLY)
    try:
        monkeypatch.setattr(sys, "stdout", GoneAfterTwoLines())
        assert main(["evaluate", str(trained_run.out_dir), "--device", "cpu"]) == 141
        assert sys.stdout.getvalue().startswith("test split, ")
    finally:
        os.close(descriptor)
