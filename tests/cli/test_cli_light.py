"""A light command line: help and --version never import torch; train's options come in sections."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from transferlab import __version__
from transferlab.cli import main
from transferlab.config.run import HELP_GROUPS, RunConfig

HELP_WITHOUT_TORCH = """
import sys
from transferlab.cli import main
for command in ([], ["train"], ["lr-find"], ["evaluate"], ["analyze"], ["predict"], ["export"], ["models"],
                ["study"], ["study", "run"], ["study", "worker"], ["study", "report"]):
    try:
        main([*command, "--help"])
    except SystemExit as exit:
        assert exit.code == 0, (command, exit.code)
heavy = [m for m in ("torch", "torchvision", "optuna", "matplotlib", "onnx", "mlflow") if m in sys.modules]
assert not heavy, heavy
import transferlab
from transferlab import RunConfig
assert "torch" not in sys.modules
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_help_does_not_import_torch():
    done = run_python(HELP_WITHOUT_TORCH)
    assert done.returncode == 0, done.stderr


def test_the_library_api_still_imports_by_name():
    done = run_python(
        "import transferlab.engine.train as module, transferlab\n"
        "from transferlab import RunConfig, train, build_run, load_checkpoint, export_checkpoint, REGISTRY\n"
        "assert callable(train) and transferlab.train is train is module.train and callable(build_run)\n"
        "assert 'squeezenet1_1' in REGISTRY and set(transferlab.__all__) <= set(dir(transferlab))\n"
    )
    assert done.returncode == 0, done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"transferlab {__version__}" and __version__


def test_train_help_groups_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for title in HELP_GROUPS:
        assert f"\n{title}:\n" in out
    assert "examples:\n  transferlab train" in out
    for f in dataclasses.fields(RunConfig):
        assert any(f.metadata["section"] in sections for sections in HELP_GROUPS.values()), f.name
