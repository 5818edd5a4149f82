"""The frozen-prefix feature pass: batched passes equal one big pass."""

from __future__ import annotations

import torch
from torch import nn

from transferlab.engine.features import compute_features
from transferlab.engine.preprocess import Preprocess

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
