"""The frozen-prefix feature pass: batched passes equal one big pass."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    quiet,
    tiny_config,
)
from torch import nn

from transferlab import RunConfig
from transferlab.engine.features import FeatureCache, compute_features, feature_key
from transferlab.engine.preprocess import Preprocess
from transferlab.engine.train import run_training
from transferlab.models.weights import weights_identity

PREPROCESS = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resolution=12)


def prefix() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())


def test_batched_features_equal_one_pass_with_a_ragged_last_batch():
    images = torch.randint(0, 256, (10, 8, 8, 3), dtype=torch.uint8)
    net = prefix()
    for mirror in (False, True):
        features = compute_features(
            net,
            images,
            PREPROCESS,
            batch_size=4,
            device=torch.device("cpu"),
            mirror=mirror,
            dtype=torch.float32,
            progress=False,
        )
        with torch.no_grad():
            expected = net(PREPROCESS(images, mirror=mirror))
        assert features.shape == expected.shape == (10, 4, 5, 5)
        torch.testing.assert_close(features, expected)
    half = compute_features(
        net, images, PREPROCESS, batch_size=4, device=torch.device("cpu"), mirror=True, progress=False
    )
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), features, atol=1e-2, rtol=1e-2)


def test_inference_chunks_hold_about_half_a_million_pixels_on_a_cpu_and_stay_large_on_cuda():
    from transferlab.engine.device import inference_batch_size

    cpu = torch.device("cpu")
    assert [inference_batch_size(cpu, r) for r in (32, 64, 96, 128, 224, 512)] == [512, 128, 56, 32, 16, 16]
    assert inference_batch_size(cpu, 8, batch_size=4096) == 512  # the training batch does not set a CPU chunk
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert inference_batch_size(cuda, 128) == 500 and inference_batch_size(cuda, 128, batch_size=1024) == 1024


def run(config, out, **kwargs):
    return run_training(config, out, log=quiet, **kwargs)


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


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------- the feature-cache key
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


# ---------------------------------------------------------------------------- bad files
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


# ---------------------------------------------------------------------------- full disks
def test_a_full_disk_for_the_feature_cache_is_a_warning(image_tree, tmp_path, monkeypatch):
    real_save = np.save

    def full(file, array, *args, **kwargs):  # file: a path or an open file
        if "features" not in str(getattr(file, "name", file)):
            return real_save(file, array, *args, **kwargs)
        file.write(b"partial") if hasattr(file, "write") else Path(file).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    config = tiny_config(image_tree, tmp_path / "cache", strategy="partial", cache_features="auto")
    with pytest.warns(UserWarning, match="kept in memory only"):
        run_training(config, tmp_path / "run", log=quiet)
    assert leftovers(tmp_path / "cache") == []
