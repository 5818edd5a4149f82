"""Batched, device-side preprocessing: uint8 NHWC in, normalised float NCHW out.

Order: (training) an auto-augment policy on the uint8 pixels -> scale to [0, 1] and normalise -> random crop / flip
at the stored resolution -> the central crop fraction and a resize to the model's resolution, or in training a
RandomResizedCrop instead. Every step is a tensor op over the whole batch (a policy: over chunks of it, augment.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import apply_policy, policy, random_resized_crop


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator, mode: str = "reflect") -> torch.Tensor:
    """Pad (by reflection unless told), then take one random HxW window per image (a gather, no Python loop)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode=mode)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, cols)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def centre_crop(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The central square of `fraction` of the side (a view)."""
    h, w = x.shape[-2:]
    side = max(1, round(min(h, w) * fraction))
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top : top + side, left : left + side]


def resize(x: torch.Tensor, resolution: int, mode: str = "bilinear", bounds=(0.0, 1.0)) -> torch.Tensor:
    """Resample to resolution x resolution; under bicubic, which overshoots at edges, values are clamped to `bounds`
    (numbers or per-channel tensors: where pixels in [0, 1] lie after normalisation)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    downsample = x.shape[-1] > resolution
    x = F.interpolate(x, size=(resolution, resolution), mode=mode, align_corners=False, antialias=downsample)
    return x.clamp_(*bounds) if mode == "bicubic" else x


@functools.lru_cache(maxsize=16)
def normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, 3, 1, 1) mean and std on `device`, made once: on a GPU, a tensor made from Python numbers is a copy
    from the host that waits for the device's queued work, and would stall every batch."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))


@dataclass
class Preprocess:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int
    crop_padding: int = 0
    flip: bool = False
    channels_last: bool = False
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    random_resized_crop: float = 0.0  # training only: the smallest area share of a RandomResizedCrop box; 0 = off
    auto_augment: str = "none"  # training only: RunConfig.auto_augment

    def __post_init__(self):
        self.policy = policy(self.auto_augment)

    def identity(self) -> dict:
        """What the evaluation-time output depends on (the feature cache's key): all but the training
        augmentations and the memory layout."""
        return {"resolution": self.resolution, "mean": list(self.mean), "std": list(self.std),
                "crop_fraction": self.crop_fraction, "interpolation": self.interpolation}  # fmt: skip

    def __call__(
        self,
        batch: torch.Tensor,
        *,
        train: bool = False,
        generator: torch.Generator | None = None,
        mirror: bool = False,
    ) -> torch.Tensor:
        # Normalised first, at the stored size: crop, flip and resampling are linear with weights that sum to one, so
        # the order does not change the result, and upsampled to the model's resolution there are 16x more pixels.
        mean, std = normalisation(tuple(self.mean), tuple(self.std), batch.device)
        if train and self.policy is not None:
            batch = apply_policy(batch, self.policy, generator)
        x = (to_float(batch) - mean) / std
        if train and self.crop_padding:
            x = random_crop(x, self.crop_padding, generator)
        if train and self.flip:
            x = random_flip(x, generator)
        if mirror:
            x = x.flip(3)
        if train and self.random_resized_crop:
            x = random_resized_crop(x, self.resolution, self.random_resized_crop, generator)
        else:
            if self.crop_fraction < 1.0:
                x = centre_crop(x, self.crop_fraction)
            x = resize(x, self.resolution, self.interpolation, bounds=(-mean / std, (1 - mean) / std))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def dataset_statistics(
    images, indices=None, chunk_pixels: int = 1 << 22
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 (N, H, W, 3) images (rows `indices`, default all), scaled to
    [0, 1]. Streamed: exact integer sums and squared sums a chunk at a time, so a memory-mapped set stays on disk."""
    rows = np.arange(len(images)) if indices is None else np.asarray(indices)
    per_image = max(1, int(np.prod(images.shape[1:3])))
    step = max(1, chunk_pixels // per_image)
    total, squares = [0, 0, 0], [0, 0, 0]
    for start in range(0, len(rows), step):
        x = torch.from_numpy(np.ascontiguousarray(images[rows[start : start + step]])).reshape(-1, 3).to(torch.int32)
        total = [t + int(v) for t, v in zip(total, x.sum(0, dtype=torch.int64).tolist())]
        squares = [q + int(v) for q, v in zip(squares, (x * x).sum(0, dtype=torch.int64).tolist())]
    n = len(rows) * per_image
    mean = tuple(t / n / 255.0 for t in total)
    std = tuple(math.sqrt((n * q - t * t) / (n * max(n - 1, 1))) / 255.0 for t, q in zip(total, squares))  # exact ints
    return mean, std
