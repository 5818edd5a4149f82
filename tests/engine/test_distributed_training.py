"""One run across processes: `python -m torch.distributed.run --standalone --nproc-per-node 2 -m transferlab train`.

The specification, with two CPU processes (gloo) on a tiny synthetic image folder:
  * frozen (the feature pass sharded, then gathered; class weights) and full (every layer under
    DistributedDataParallel): the run finishes, rank 0 alone writes metrics.json, best.pt,
    config.json, split.json and prints one result line, and every epoch's training and validation loss and accuracy
    equal a one-process run's of the same config within LOSS_TOLERANCE, accuracies to the image (dropout off and no
    random augmentation: only the order of float additions differs); the cached features are the one-process
    run's, row for row; `evaluate best.pt` reproduces the recorded validation figures;
  * a 2-process run killed with SIGKILL (every process) after an epoch resumes from state.pt, and finishes with
    exactly the history of an uninterrupted 2-process run, dropout and flips included (each process's own draws
    are reseeded per epoch);
  * a process whose partner dies stops with one line instead of waiting for it;
  * a batch size the process count does not divide is refused in one line, once, before anything is written;
    under torchrun every command but `train` is refused the same way, and only rank 0 prints;
  * without torchrun's variables nothing changes (SINGLE); the shares of a batch cover it once, in order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_tree, quiet, subprocess_env, tiny_config, wait_for

from transferlab import cli
from transferlab.data.sources import load_image_folder
from transferlab.engine import distributed
from transferlab.engine.distributed import SINGLE, Distributed, check_batch_size, from_environment
from transferlab.engine.train import train
from transferlab.errors import ConfigError
from transferlab.inference.evaluate import evaluate_checkpoint

# Relative difference allowed between a 2-process and a 1-process run's losses: the processes add up their shares'
# gradients in another order than one process adds up a batch, a float32 rounding difference (about 1e-7) per step
# that the next steps carry on. Measured here: at most 1e-6 after two epochs; a share weighted wrongly (the last
# batch's 1 + 2 images averaged as equals) is off by more than 1e-2. Accuracies may differ by at most one image,
# should a rounding difference land on a tie (none did).
LOSS_TOLERANCE = 1e-4

RUN = dict(
    weights="none",
    resolution=32,
    batch_size=8,  # 27 training images: three batches of 8, split 4 + 4, and a last one of 3 (see SHARES)
    test_fraction=0.2,
    val_fraction=0.2,
    device="cpu",
    progress=False,
    head="linear",
    dropout=0.0,
    lr=0.01,
    epochs=2,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("ddp") / "images", per_class=15, size=24)


def toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def torchrun(out: Path, config: Path) -> list[str]:
    """`transferlab train` in two processes, as a user starts it (--standalone: a free port of its own)."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*prefix, "-m", "transferlab", "train", "--config", str(config), "--out", str(out)]


def run_torchrun(args: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**subprocess_env(), **(env or {})}
    )


def write_config(path: Path, tree: Path, cache: Path, **values) -> Path:
    path.write_text(toml({**RUN, "data": str(tree), "cache_dir": str(cache), **values}))
    return path


def history(directory: Path) -> list[dict]:
    return json.loads((directory / "metrics.json").read_text())["history"]


def assert_equivalent(two: list[dict], one: list[dict], n_train: int, n_val: int) -> None:
    assert len(two) == len(one)
    for a, b in zip(two, one):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_TOLERANCE), (a["epoch"], key, a[key], b[key])
        assert abs(a["train_accuracy"] - b["train_accuracy"]) <= 1 / n_train + 1e-12, a["epoch"]
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / n_val + 1e-12, a["epoch"]
        assert a["lr"] == b["lr"]


# ---------------------------------------------------------------------------- equal to one process
# How each epoch's last batch is shared out: batch 10 leaves 7 images, 3 for rank 0 and 4 for rank 1 (their losses
# weighted 3/7 and 4/7); batch 8 leaves 3, too few for two pairs: rank 0 takes them all and rank 1 steps at weight 0.
SHARES = [("frozen", {"class_weights": "balanced", "batch_size": 10}), ("full", {"batch_size": 8})]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, options", SHARES)
def test_two_processes_train_the_run_one_process_trains(tree, tmp_path, strategy, options):
    values = {"strategy": strategy, **options}
    config = write_config(tmp_path / "run.toml", tree, tmp_path / "cache2", **values)
    out = tmp_path / "two"
    done = run_torchrun(torchrun(out, config))
    assert done.returncode == 0, done.stdout + done.stderr
    # written once, by rank 0: one result line, the run's files, nothing left over
    assert len(re.findall(r"best epoch \d", done.stdout)) == 1, done.stdout
    shown = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # .lock: rank 0's hold on the folder
    assert shown == ["best.pt", "config.json", "digests.npz", "epochs.csv", "metrics.json", "split.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["environment"]["world_size"] == 2 and metrics["environment"]["backend"] == "gloo"
    assert metrics["finished"] and metrics["input_path"] == ("cached" if strategy == "frozen" else "images")

    one = train(tiny_config(tree, tmp_path / "cache1", **{**RUN, **values}), tmp_path / "one", log=quiet)
    assert json.loads((out / "split.json").read_text()) == json.loads((tmp_path / "one" / "split.json").read_text())
    assert_equivalent(metrics["history"], one.history, metrics["n_train"], metrics["n_val"])

    if strategy == "frozen":  # the shards of the feature pass were gathered in order: the one-process cache's rows
        (two_file,) = (tmp_path / "cache2" / "features").glob("*.npy")
        one_file = tmp_path / "cache1" / "features" / two_file.name  # the same key
        a, b = np.load(two_file).astype(np.float32), np.load(one_file).astype(np.float32)
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-2, atol=1e-3)

    # best.pt holds the model validation scored (every process had rank 0's weights and buffers)
    data = load_image_folder(tree, tmp_path / "cache1", progress=False)
    val = np.asarray(json.loads((out / "split.json").read_text())["val"])
    result = evaluate_checkpoint(out / "best.pt", data, indices=val, device="cpu")
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert result["accuracy"] == pytest.approx(best["val_accuracy"])
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_batchnorm_statistics_are_one_set_so_best_pt_is_what_validation_scored(tree, tmp_path):
    """ResNet-18 at 32 px: its last BatchNorm layers see 1x1 maps, so no process may train on a single image (the
    last batch of 3 goes to rank 0 alone), and the running statistics each process gathered on its own share are
    averaged after every epoch: the processes then score their shares of validation with the same model."""
    config = write_config(tmp_path / "run.toml", tree, tmp_path / "cache", arch="resnet18", strategy="full")
    out = tmp_path / "run"
    done = run_torchrun(torchrun(out, config))
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    data = load_image_folder(tree, tmp_path / "cache", progress=False)
    val = np.asarray(json.loads((out / "split.json").read_text())["val"])
    result = evaluate_checkpoint(out / "best.pt", data, indices=val, device="cpu")
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert result["accuracy"] == pytest.approx(best["val_accuracy"])
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


# ---------------------------------------------------------------------------- killed and resumed
def descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and theirs (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process it started at once (a machine going down)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_where_it_stood(tree, tmp_path):
    # dropout and flips on: each process draws its own, and a resumed run must draw what the uninterrupted one drew
    values = dict(strategy="full", dropout=0.5, flip=True, epochs=6)
    config = write_config(tmp_path / "run.toml", tree, tmp_path / "cache", **values)
    whole = run_torchrun(torchrun(tmp_path / "whole", config))
    assert whole.returncode == 0, whole.stdout + whole.stderr

    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(torchrun(out, config), stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
        try:
            wait_for(lambda: (out / "state.pt").exists(), 120, proc, "the first epoch's state.pt")
        finally:
            kill_all(proc)
    time.sleep(1)  # nothing is left to write
    stood = torch.load(out / "state.pt", weights_only=True)["epoch"]
    assert 1 <= stood < values["epochs"], "the run was not killed in the middle"
    assert not json.loads((out / "metrics.json").read_text())["finished"]

    resumed = run_torchrun(torchrun(out, config))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from epoch {stood}" in resumed.stderr
    assert not (out / "state.pt").exists()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(history(out)) == strip(history(tmp_path / "whole"))


# ---------------------------------------------------------------------------- a process lost
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_process_whose_partner_dies_stops_with_one_line(tree, tmp_path):
    """Started by hand (as a launcher other than torchrun would): nobody stops the survivor but itself."""
    config = write_config(tmp_path / "run.toml", tree, tmp_path / "cache", strategy="full", epochs=200)
    out = tmp_path / "run"
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        env = {**subprocess_env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), distributed.TIMEOUT_ENV: "20"}
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        command = [sys.executable, "-m", "transferlab", "train", "--config", str(config), "--out", str(out)]
        procs.append(subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
    try:
        wait_for(lambda: (out / "state.pt").exists(), 120, procs[0], "the first epoch")
        os.kill(procs[1].pid, signal.SIGKILL)
        started = time.monotonic()
        procs[0].wait(timeout=60)
        assert time.monotonic() - started < 40
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    text = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode == 1, text
    ours = [line for line in text.splitlines() if line.startswith("transferlab:")]
    assert len(ours) == 1 and ours[0].startswith("transferlab: error: process 0 of 2: lost the other"), text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------- refused in one line
@pytest.mark.slow
def test_a_batch_size_the_processes_do_not_divide_is_one_line(tree, tmp_path):
    config = write_config(tmp_path / "run.toml", tree, tmp_path / "cache", strategy="frozen", batch_size=7)
    out = tmp_path / "run"
    done = run_torchrun(torchrun(out, config))
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("transferlab:")]
    assert ours == [
        "transferlab: error: batch_size = 7 does not split evenly over 2 processes: each takes batch_size / 2 "
        "images of every batch, so choose a multiple of 2 (e.g. 6 or 8)"
    ], done.stderr
    assert "transferlab/" not in "".join(re.findall(r'File "[^"]*"', done.stderr))  # no traceback of ours
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_under_torchrun_only_train_runs_and_rank_0_reports(monkeypatch, capsys, tmp_path, rank, printed):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    assert cli.main(["lr-find", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    expected = "transferlab: error: `transferlab lr-find` runs as one process: only `train` runs across the 2 "
    expected += "processes torchrun starts\n"
    assert err == (expected if printed else "")
    # the batch size is checked before any process group is joined
    assert cli.main(["train", "--data", str(tmp_path), "--batch-size", "9", "--out", str(tmp_path / "o")]) == 2
    assert ("split evenly over 2 processes" in capsys.readouterr().err) == printed


# ---------------------------------------------------------------------------- the pieces
def test_without_torchrun_a_run_is_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() is SINGLE and not SINGLE.active and SINGLE.main
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert from_environment() is SINGLE  # torchrun --nproc-per-node 1: one process, no process group
    with distributed.session("cpu", 7) as world:
        assert world is SINGLE and not torch.distributed.is_initialized()
    x = torch.arange(6.0).reshape(3, 2)
    assert SINGLE.gather_rows(x, 3) is x and SINGLE.any(False) is False and SINGLE.describe() == {}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "expected integers"),
        ({"WORLD_SIZE": "2"}, "expected integers"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "not a valid process"),
    ],
)
def test_a_broken_torchrun_environment_is_one_line(monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message) as error:
        from_environment()
    assert "\n" not in str(error.value)


def test_the_timeout_is_a_positive_number_of_seconds(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "0")
    with pytest.raises(ConfigError, match="TRANSFERLAB_DIST_TIMEOUT=0: expected a positive number"):
        distributed.timeout_seconds()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_seconds() == 12.5


@pytest.mark.parametrize("n", [0, 1, 5, 8, 29])
@pytest.mark.parametrize("world_size, among", [(2, None), (3, None), (4, None), (4, 2), (3, 1)])
def test_the_shares_of_a_batch_cover_it_once_in_rank_order(n, world_size, among):
    parts = [Distributed(world_size, rank).part(n, among) for rank in range(world_size)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [p.stop - p.start for p in parts[: among or world_size]]
    assert max(sizes) - min(sizes) <= 1 and all(p.start == p.stop for p in parts[among or world_size :])


def test_check_batch_size():
    check_batch_size(8, Distributed(4, 0))
    with pytest.raises(ConfigError, match=r"choose a multiple of 4 \(e.g. 4 or 8\)"):
        check_batch_size(6, Distributed(4, 1))
    with pytest.raises(ConfigError, match=r"choose a multiple of 4 \(e.g. 4\)$"):
        check_batch_size(3, Distributed(4, 1))
