"""Evaluate and predict see a file exactly as training stored it.

A checkpoint records the preprocessing policy and the exact side its run stored every image at; evaluate and predict
store any file at that side, so predict gives the probabilities evaluate computes, file by file, on folders of mixed
sizes and shapes. Checkpoints of earlier formats read as crop at the image's own size, as they were trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CLASS_COLOURS,
    noise_image,
    photo_tree,
    quiet,
    tiny_config,
)
from PIL import Image

from transferlab import RunConfig
from transferlab.data.sources import (
    load_images,
    scan_image_folder,
)
from transferlab.engine.checkpoint import Checkpoint
from transferlab.engine.train import run_training
from transferlab.inference.evaluate import evaluate_checkpoint, stored_as_trained
from transferlab.inference.predict import load_checkpoint, predict_files


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


# ---------------------------------------------------------------------------- the storage transform
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


# ---------------------------------------------------------------------------- predict == evaluate
@pytest.mark.parametrize("policy", ["crop", "squash", "pad"])
def test_predict_gives_the_probabilities_evaluate_computes(tmp_path, policy):
    root = photo_tree(tmp_path / "wide", (64, 40), per_class=6)
    config = tiny_config(root, tmp_path / "cache", resolution=32, storage_size=32, resize_policy=policy)
    run_training(config, tmp_path / "run", log=quiet)
    checkpoint = tmp_path / "run" / "best.pt"
    saved = Checkpoint.load(checkpoint)
    assert (saved.resize_policy, saved.storage_size) == (policy, 32)
    data = load_images(config)
    assert data.images.shape == (18, 32, 32, 3)  # reduced from 64 x 40
    loaded = load_checkpoint(checkpoint, "cpu")
    expected = loaded.probabilities(data.images)
    assert evaluate_checkpoint(checkpoint, data, device="cpu")["n"] == 18
    files = sorted(p for p in root.rglob("*.jpg"))
    results = predict_files(checkpoint, files, top=3, device="cpu")
    for row, result in zip(expected, results):
        got = torch.zeros(3)
        for entry in result["top"]:
            got[loaded.classes.index(entry["class"])] = entry["probability"]
        assert torch.allclose(got, row, atol=1e-6), (result, row)


def test_format_2_checkpoints_read_as_crop_at_the_images_own_size(trained_run, tmp_path):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    raw["format"] = "transferlab-checkpoint-2"
    del raw["resize_policy"], raw["storage_size"]
    torch.save(raw, tmp_path / "old.pt")
    old = Checkpoint.load(tmp_path / "old.pt")
    assert (old.resize_policy, old.storage_size) == ("crop", None)
