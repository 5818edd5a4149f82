"""Real data from ../shared: CIFAR-10 JPEGs and the local ImageNet-pretrained SqueezeNet 1.1 features.

Skipped, with the reason, where ../shared is absent. The folder is decoded once per session (about 20 s).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import quiet

from transferlab import RunConfig, train
from transferlab.cli import main
from transferlab.data.sources import load_images, scan_image_folder
from transferlab.inference.evaluate import evaluate_checkpoint
from transferlab.models.registry import resolve

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="session")
def shared_config(shared_cifar, shared_weights, shared_cache_dir) -> RunConfig:
    return RunConfig.from_dict(
        {
            "data": str(shared_cifar),
            "weights": str(shared_weights),
            "cache_dir": str(shared_cache_dir),
            "strategy": "frozen",
            "resolution": 32,
            "limit": 2000,
            "epochs": 3,
            "head": "linear",
            "dropout": 0.0,
            "lr": 1e-2,
            "batch_size": 64,
            "device": "cpu",
            "progress": False,
        }
    )


@pytest.fixture(scope="session")
def shared_images(shared_config):
    return load_images(resolve(shared_config))


@pytest.fixture(scope="session")
def shared_run(shared_config, shared_images, tmp_path_factory):
    return train(shared_config, tmp_path_factory.mktemp("shared-run"), images=shared_images, log=quiet)


def test_frozen_pretrained_features_learn_cifar10(shared_run, shared_weights):
    metrics = json.loads((shared_run.out_dir / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (1600, 200, 200)
    assert metrics["weights"] == str(shared_weights) and metrics["input_path"] == "cached"
    assert len(metrics["classes"]) == 10
    assert shared_run.best_val_accuracy > 0.25, metrics["history"]  # chance is 0.10


def test_limit_subset_is_stratified(shared_run, shared_images):
    split = json.loads((shared_run.out_dir / "split.json").read_text())
    used = np.concatenate([split["train"], split["val"], split["test"]])
    assert len(shared_images) == 50_000
    assert np.bincount(shared_images.labels[used], minlength=10).tolist() == [200] * 10


def test_checkpoint_evaluates_on_a_copied_tree(shared_run, shared_cifar, shared_images, tmp_path, capsys):
    """Held-out test images of four classes, copied into a new tree: the CLI evaluates them by class name."""
    files = scan_image_folder(shared_cifar).files  # the order the indices refer to
    test_idx = np.asarray(json.loads((shared_run.out_dir / "split.json").read_text())["test"])
    chosen = []
    for name in ("truck", "cat", "ship", "dog"):
        label = shared_images.classes.index(name)
        picks = [i for i in test_idx if shared_images.labels[i] == label][:5]
        for i in picks:
            path, file_label = Path(files[i][0]), files[i][1]
            assert file_label == label and path.parent.name == name
            (tmp_path / "tree" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / "tree" / name / path.name)
        chosen.extend(picks)
    best = shared_run.out_dir / "best.pt"
    assert main(["evaluate", str(best), "--data", str(tmp_path / "tree"), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 20
    assert [result["per_class_accuracy"][c] is None for c in ("airplane", "cat")] == [True, False]
    # the same images, straight from the decoded training folder
    direct = evaluate_checkpoint(best, shared_images, indices=np.asarray(chosen), device="cpu")
    assert result["accuracy"] == pytest.approx(direct["accuracy"])
    assert result["confusion_matrix"] == direct["confusion_matrix"]
