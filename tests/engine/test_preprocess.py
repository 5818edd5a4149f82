"""Device-side preprocessing: uint8 NHWC -> normalised float NCHW, with random crop / flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferlab.engine.preprocess import Preprocess, dataset_statistics, random_crop, random_flip, resize, to_float


def batch(n=6, h=8, w=10, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_crop_windows(image: np.ndarray, padding: int) -> list[np.ndarray]:
    """Slow reference: every HxW window of the reflection-padded (C, H, W) image."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)), mode="reflect")
    return [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]


def test_to_float_layout_and_scale():
    x = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8)
    y = to_float(x)
    assert y.shape == (2, 3, 5, 4) and y.dtype == torch.float32
    torch.testing.assert_close(y[1, 2, 3, 1], x[1, 3, 1, 2].float() / 255)


@pytest.mark.parametrize("padding", [1, 3])
def test_random_crop_is_a_window_of_the_reflected_input(padding):
    x = batch(n=8)
    out = random_crop(x, padding, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    offsets = []
    for i in range(len(x)):
        windows = reference_crop_windows(x[i].numpy(), padding)
        matches = [k for k, window in enumerate(windows) if np.array_equal(window, out[i].numpy())]
        assert matches, f"image {i} is not a window of its padded input"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # offsets differ between images


def test_random_crop_offsets_come_from_the_generator():
    x = batch(n=5)
    padding = 2
    gen = torch.Generator().manual_seed(5)
    out = random_crop(x, padding, gen)
    replay = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 2 * padding + 1, (5,), generator=replay)
    dx = torch.randint(0, 2 * padding + 1, (5,), generator=replay)
    for i in range(5):
        expected = reference_crop_windows(x[i].numpy(), padding)[int(dy[i]) * (2 * padding + 1) + int(dx[i])]
        np.testing.assert_array_equal(out[i].numpy(), expected)
    torch.testing.assert_close(random_crop(x, padding, torch.Generator().manual_seed(5)), out)


def test_random_flip_flips_about_half():
    x = batch(n=1000, h=4, w=5)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 400 < int(flipped.sum()) < 600


def test_resize():
    x = batch(n=2, h=16, w=16)
    assert resize(x, 16) is x
    assert resize(x, 32).shape == (2, 3, 32, 32) and resize(x, 8).shape == (2, 3, 8, 8)
    constant = torch.full((1, 3, 10, 10), 0.25)
    torch.testing.assert_close(resize(constant, 37), torch.full((1, 3, 37, 37), 0.25))
    torch.testing.assert_close(resize(constant, 4), torch.full((1, 3, 4, 4), 0.25))


def test_normalisation_uses_mean_and_std():
    pre = Preprocess(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0), resolution=4)
    x = torch.full((2, 4, 4, 3), 102, dtype=torch.uint8)  # 0.4 after scaling
    out = pre(x)
    assert out.shape == (2, 3, 4, 4)
    expected = (
        torch.tensor([(0.4 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.4 - 0.3) / 2.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    )
    torch.testing.assert_close(out, expected)


def test_preprocess_augments_only_in_training():
    pre = Preprocess(mean=(0, 0, 0), std=(1, 1, 1), resolution=8, crop_padding=2, flip=True)
    x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    plain = pre(x)
    torch.testing.assert_close(plain, to_float(x))
    torch.testing.assert_close(pre(x, mirror=True), to_float(x).flip(3))
    augmented = pre(x, train=True, generator=torch.Generator().manual_seed(0))
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)


def test_preprocess_resizes_to_the_resolution():
    pre = Preprocess(mean=(0, 0, 0), std=(1, 1, 1), resolution=32)
    assert pre(torch.zeros(3, 16, 16, 3, dtype=torch.uint8)).shape == (3, 3, 32, 32)


def test_dataset_statistics():
    images = np.zeros((2, 2, 2, 3), np.uint8)
    images[..., 0] = 255
    images[0, ..., 1] = 255
    mean, std = dataset_statistics(images)
    assert mean == pytest.approx((1.0, 0.5, 0.0))
    assert (
        std[0] == pytest.approx(0.0)
        and std[2] == pytest.approx(0.0)
        and std[1] == pytest.approx(np.std([1] * 4 + [0] * 4, ddof=1))
    )


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resolution", [37, 64, 9])
def test_normalising_before_resizing_gives_what_resizing_first_gives(interpolation, resolution):
    """Preprocess normalises at the stored size (cheaper); resampling is linear with weights that sum to one, so the
    result is the textbook order's: resize the [0, 1] pixels (bicubic clamped to [0, 1]), then normalise."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, (4, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x[0] = 0  # black and white edges: where bicubic overshoots and the clamp matters
    x[0, 5:15, 5:15] = 255
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out = Preprocess(mean, std, resolution, interpolation=interpolation, crop_fraction=0.9)(x)
    pixels = resize(to_float(x)[..., 1:19, 1:19], resolution, interpolation)  # the 0.9 centre crop of 20 px is 18
    assert out.shape == (4, 3, resolution, resolution)
    torch.testing.assert_close(out, (pixels - m) / s, atol=2e-5, rtol=0)
    if interpolation == "bicubic":
        low, high = (0 - m) / s, (1 - m) / s
        assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()
