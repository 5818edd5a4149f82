"""Helpers shared by the test modules (imported as `helpers`; conftest.py holds the fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_CIFAR = SHARED / "datasets" / "cifar10-train-jpeg"
SHARED_WEIGHTS = SHARED / "weights" / "squeezenet1_1-imagenet-features.pth"

# The device tiny_config's runs (and the tests that evaluate them on "the test device") use: the CPU unless
# TRANSFERLAB_TEST_DEVICE says otherwise, so a GPU machine runs the same tests on CUDA (benchmarks/gpu_check.sh).
TEST_DEVICE = os.environ.get("TRANSFERLAB_TEST_DEVICE", "cpu")

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
