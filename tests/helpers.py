"""Helpers shared by the test modules (imported as `helpers`; conftest.py holds the fixtures)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from transferlab.config.study import StudySpec, point_key
from transferlab.scoring.stats import decimals_for, wilson_interval
from transferlab.study.identity import slug
from transferlab.study.storage import resolve_url

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_CIFAR = SHARED / "datasets" / "cifar10-train-jpeg"
SHARED_WEIGHTS = SHARED / "weights" / "squeezenet1_1-imagenet-features.pth"

# The device tiny_config's runs (and the tests that evaluate them on "the test device") use: the CPU unless
# TRANSFERLAB_TEST_DEVICE says otherwise, so a GPU machine runs the same tests on CUDA (benchmarks/gpu_check.sh).
TEST_DEVICE = os.environ.get("TRANSFERLAB_TEST_DEVICE", "cpu")

# A PostgreSQL server for the tests of shared storages (CI starts one: .ci/postgres.sh); without it they skip.
POSTGRES_URL = os.environ.get("TRANSFERLAB_TEST_POSTGRES_URL", "")
NEEDS_POSTGRES = pytest.mark.skipif(
    not POSTGRES_URL,
    reason="needs a PostgreSQL server: set TRANSFERLAB_TEST_POSTGRES_URL "
    "(e.g. export TRANSFERLAB_TEST_POSTGRES_URL=$(bash .ci/postgres.sh | tail -1))",
)

# Class-dependent mean colour: a colour-noise image whose class a linear head can learn.
CLASS_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "grey": (128, 128, 128)}


def noise_image(colour, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 noise around `colour`."""
    h, w = (size, size) if isinstance(size, int) else size
    return np.clip(rng.normal(colour, 40.0, (h, w, 3)), 0, 255).astype(np.uint8)


def make_image_tree(
    root: Path, classes=("red", "green", "blue"), per_class: int = 12, size: int = 24, ext: str = "png", seed: int = 0
) -> Path:
    """<root>/<class>/<i>.<ext>, `per_class` coloured-noise images per class."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(noise_image(CLASS_COLOURS[name], size, rng)).save(root / name / f"{i:03d}.{ext}")
    return root


def tiny_config(data: Path | str, cache_dir: Path | str, **overrides):
    """A RunConfig that trains in well under a second on a CPU (on TEST_DEVICE), its backbone's defaults filled in
    (models.resolve: as the CLI and a study hand configs to the library)."""
    from transferlab import RunConfig
    from transferlab.models.registry import resolve

    values = dict(
        data=str(data),
        cache_dir=str(cache_dir),
        weights="none",
        resolution=32,
        epochs=1,
        batch_size=8,
        test_fraction=0.2,
        val_fraction=0.2,
        device=TEST_DEVICE,
        progress=False,
    )
    values.update(overrides)
    return resolve(RunConfig.from_dict(values))


def history_without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def quiet(_text: str) -> None:
    """Log sink for tests."""


def trained_run(config, out, **kwargs):
    """(the Run as built, its RunResult): `engine.train.run_training` with a hook that keeps the run, for tests that
    look inside it (its inputs, views, precision)."""
    from transferlab.engine.hooks import Hook
    from transferlab.engine.train import run_training

    class Keep(Hook):
        def on_fit_start(self, run, state) -> None:
            self.run = run

    keep = Keep()
    result = run_training(config, out, **{"log": quiet, **kwargs}, hooks=[keep])
    return keep.run, result


def built_run(config, out=None, **kwargs):
    """A run set up as training sets it up (engine.run.prepare_run + build_run), not trained."""
    from transferlab.engine.run import build_run, prepare_run

    return build_run(prepare_run(config, out), **{"log": quiet, **kwargs})


def train_args(data, out, cache, *extra):
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--weights",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--test-fraction",
        "0.2",
        "--val-fraction",
        "0.2",
        "--no-progress",
        "--resolution",  # the tests' tiny images; a photo run's default is its backbone's pretrained side
        "32",
        *extra,
    ]


def assert_one_line_error(captured, *fragments):
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("transferlab: error: ") and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def write_spec(
    path: Path, data: Path, cache: Path, grid: dict, *, name: str = "synthetic", top: dict | None = None, **run
) -> Path:
    """A study spec on the synthetic tree: no pretrained weights, 32 px, CPU, no progress bars, a private cache."""
    values = {
        "data": str(data),
        "weights": "none",
        "resolution": 32,
        "progress": False,
        "cache_dir": str(cache),
        "device": "cpu",
        "test_fraction": 0.2,
        "val_fraction": 0.2,
        **run,
    }
    lines = [f"name = {toml_value(name)}"] + [f"{k} = {toml_value(v)}" for k, v in (top or {}).items()]
    lines += ["", "[run]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    lines += ["", "[grid]"] + [f"{k} = {toml_value(v)}" for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def study_tree(root: Path) -> Path:
    return make_image_tree(root, per_class=12, size=16)


def load_study(directory: Path, url: str | None = None) -> optuna.Study:
    """The (only) study in a study directory's storage, or in `url`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = url or resolve_url(directory, None)
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def complete_by_key(study: optuna.Study) -> dict[str, list[optuna.trial.FrozenTrial]]:
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("kind") in ("run", "derived"):
            out.setdefault(t.user_attrs["key"], []).append(t)
    return out


def snapshot(study: optuna.Study) -> dict[int, tuple]:
    """number -> (state, key, datetime_complete) of every trial."""
    return {t.number: (t.state, t.user_attrs.get("key"), t.datetime_complete) for t in study.get_trials(deepcopy=False)}


def state_file_of(directory: Path, key: str):
    """A callable: the state.pt of the job `key`'s run directory (named `<readable key>-<hash>`), or None."""
    prefix = slug(key, "").rsplit("-", 1)[0]
    return lambda: next(iter((directory / "trials").glob(f"{prefix}-*/state.pt")), None)


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000", "PYTHONUNBUFFERED": "1"}


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def check_resumed(
    study: optuna.Study, spec: StudySpec, before: dict[int, tuple], killed_key: str, directory: Path
) -> None:
    """Every grid point complete once, with its checkpoint; every trial finished before the kill untouched and still
    the only one of its key; the killed trial failed and was retried once."""
    COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    by_key = complete_by_key(study)
    assert set(by_key) == {point_key(p) for p in spec.points()}, "a grid point was lost"
    assert all(len(v) == 1 for v in by_key.values()), {k: [t.number for t in v] for k, v in by_key.items()}
    assert all((directory / t.user_attrs["checkpoint"]).is_file() for (t,) in by_key.values())
    after = snapshot(study)
    finished_before = {n: v for n, v in before.items() if v[0] == COMPLETE}
    assert finished_before, "nothing had finished before the kill"
    for number, (state, key, completed) in finished_before.items():
        assert after[number] == (state, key, completed), f"trial {number} changed"
        assert [t.number for t in by_key[key]] == [number], f"{key} was run again"
    killed = [n for n, v in before.items() if v[0] == optuna.trial.TrialState.RUNNING]
    assert len(killed) == 1 and before[killed[0]][1] == killed_key
    assert after[killed[0]][0] == FAIL  # failed (its process gone, or silent past the heartbeat grace) ...
    (retry,) = by_key[killed_key]  # ... and queued again, once
    assert study.trials[retry.number].system_attrs["failed_trial"] == killed[0]


def parse_table(lines: list[str]) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    assert set(rows[1]) == {"---"}, rows[1]  # the separator under the header
    return [rows[0]] + rows[2:]


def section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def tables_in(text: str) -> list[tuple[str, list[list[str]]]]:
    """(the ### heading above it, rows) for every table of a markdown text."""
    found, heading, block = [], "", []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            found.append((heading, parse_table(block)))
            block = []
        if line.startswith("### "):
            heading = line[4:]
    return found


def places(values: list[float], n: int, proportions: list[float]) -> int:
    """The precision rule: no finer than the Wilson interval of the mean proportion of n images, nor than the
    replicates' spread."""
    p = statistics.mean(proportions)
    low, high = wilson_interval(round(p * n), n)
    d = decimals_for(100 * max(p - low, high - p))
    return min(d, decimals_for(100 * statistics.stdev(values))) if len(values) > 1 else d


def write_fake_cifar(root, per_batch: int = 20, test: int = 30, seed: int = 0):
    """cifar-10-batches-py in the official format: pickled dicts of uint8 (N, 3072) rows, CHW order."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, handle)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in np.arange(n) % 10],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return folder


def toml_entry(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_entry(v)}" for k, v in value.items()) + "}"
    return toml_value(value)


def search_spec(
    path: Path, data: Path, cache: Path, search=None, space=None, grid=None, name: str = "searched", **run
) -> Path:
    """A study spec on the synthetic tree with a [search] table (linear head: it learns in an epoch or two)."""
    run = {"head": "linear", "epochs": 1, "batch_size": 8, **run}
    run = {k: v for k, v in run.items() if k not in (grid or {})}  # an axis sets it; [run] beside it is refused
    write_spec(path, data, cache, grid or {}, name=name, **run)
    lines = ["", "[search]"] + [f"{k} = {toml_entry(v)}" for k, v in (SEARCH if search is None else search).items()]
    space = SPACE if space is None else space
    if space:
        lines += ["", "[search.space]"] + [f"{k} = {toml_entry(v)}" for k, v in space.items()]
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


SEARCH = {"sampler": "random", "n_trials": 3, "pruner": "none"}


SPACE = {"lr": {"low": 1e-3, "high": 3e-2, "log": True}, "dropout": [0.0, 0.3]}


def model_input(images: np.ndarray, resolution: int) -> torch.Tensor:
    """What the exported model expects: float32 NCHW in [0, 1] at the checkpoint's resolution (resized as
    evaluate resizes)."""
    from transferlab.engine.preprocess import resize, to_float

    return resize(to_float(torch.as_tensor(images)), resolution).contiguous()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: JPEG-friendly, different everywhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


def photo_tree(root, size: tuple[int, int], per_class: int = 5, ext: str = "jpg"):
    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = photo(*size, seed=10 * c + i)
            tint = np.asarray(image).astype(np.int16)
            tint[..., c] = np.clip(tint[..., c] + 80, 0, 255)  # a class a linear head can learn
            Image.fromarray(tint.astype(np.uint8)).save(root / name / f"{i}.{ext}", quality=90)
    return root


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
