"""What the trainable part of a run reads: the frozen groups' cached output, or the uint8 images on the device.

When the strategy leaves a prefix of the network frozen and no random crop precedes it, that prefix's output for an
image never changes: it is computed once per image and view (features.py, kept in the feature cache) and the epochs
train only the rest ("cached"). Otherwise each batch is preprocessed from the images and, where a prefix is frozen,
passed through it without gradients ("images"). Either way a batch is an index selection of tensors on the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config.run import RunConfig
from ..data.imageset import ImageSet
from ..data.split import Split
from .augment import Mixing
from .distributed import Distributed
from .features import FeatureCache, compute_features, feature_key
from .forward import Forward, prefix_output
from .preprocess import random_crop

# the augmentations that change the frozen prefix's input (flips do too, but two cached views cover them); each is off
# at its field's default
RANDOM_INPUTS = ("crop_padding", "random_resized_crop", "auto_augment", "mixup", "cutmix")


def input_path(config: RunConfig, cut: int, group_names: list[str]) -> tuple[str, str]:
    """("cached" or "images", why) for a run whose first `cut` groups are frozen."""
    if cut == 0:
        return "images", "nothing is frozen"
    if config.cache_features == "off":
        return "images", "cache_features = off"
    off = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    random = [f"{name} = {getattr(config, name)}" for name in RANDOM_INPUTS if getattr(config, name) != off[name]]
    if random:
        return "images", f"{', '.join(random)} changes the frozen prefix's input every epoch"
    reason = f"groups {', '.join(group_names[:cut])} are frozen and see no random crop"
    if config.flip or config.tta_flip:
        reason += "; mirrored views cached too, so flips stay exact"
    return "cached", reason


@dataclass
class TrainingInputs:
    """The images of one run on its device (or, too large for it, in host memory, moved a batch at a time) and, on
    the cached path, the frozen groups' output of the training and validation images, one tensor per view."""

    path: str  # "cached" or "images"
    pixels: torch.Tensor  # uint8 (N, H, W, 3)
    streamed: bool  # the pixels stay in host memory
    forward: Forward  # the prefix, preprocessing and precision the cached views were computed with
    views: list[torch.Tensor] | None = None  # cached: the view's output of each used row (the mirror second)
    view_index: torch.Tensor | None = None  # cached: image index -> row of `views` (-1: not used)
    mixing: Mixing | None = None  # images: mixup / cutmix of each training batch

    def pixels_of(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.streamed:
            return self.pixels[idx]
        return self.pixels[idx.cpu()].to(self.forward.device, non_blocking=True)

    def features(self, idx: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        """The frozen groups' output of these images (one view), as validation and inference see it."""
        if self.path == "cached":
            return self.views[1 if mirror else 0][self.view_index[idx]].float()
        return self.forward.features(self.pixels_of(idx), mirror)

    def training_batch(
        self, idx: torch.Tensor, labels: torch.Tensor, config: RunConfig, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable part's input for a training batch, and its targets: the labels, or (N, K) blended ones under
        mixup / cutmix. Its random flips, crops, policies and blends are drawn from `generator`."""
        forward, y = self.forward, labels[idx]
        if self.path == "cached":
            rows = self.view_index[idx]
            if config.flip:
                flip = torch.rand(len(idx), device=forward.device, generator=generator) < 0.5
                x = self.views[0][rows]
                x[flip] = self.views[1][rows[flip]]  # gather the mirrored rows only where the coin says so
            else:
                x = self.views[0][rows]
            x = x.float()
        else:
            x = forward.preprocess(self.pixels_of(idx), train=True, generator=generator)
            if self.mixing is not None:
                x, y = self.mixing(x, y, generator)
            with torch.no_grad():
                x = prefix_output(forward.prefix, x, autocast=forward.autocast, feature_dtype=None)
        if config.feature_shift:
            # zeros, not reflection: a ReLU map is zero where nothing fires, and a 1x1 map has nothing to reflect
            x = random_crop(x, config.feature_shift, generator, mode="constant")
        return x, y


def place_pixels(images: ImageSet, device: torch.device, free: int | None, log: Callable[[str], None]):
    """The uint8 images as one tensor, and whether it stays in host memory: on the CPU the (memory-mapped) array
    itself, no copy; on CUDA the whole tensor on the device when it fits in free memory (with a quarter to spare),
    else left on the host and moved a batch at a time."""
    pixels = torch.from_numpy(images.images)
    streamed = free is not None and pixels.nbytes >= 0.75 * free
    if free is None:
        return pixels, streamed
    if not streamed:
        return pixels.to(device), streamed
    log(f"images stay in host memory ({pixels.nbytes / 2**30:.1f} GiB; the device has {free / 2**30:.1f} free)")
    return pixels, streamed


def cached_views(
    inputs: TrainingInputs,
    images: ImageSet,
    split: Split,
    *,
    config: RunConfig,
    cut: int,
    weights: str,
    cache: FeatureCache,
    dist: Distributed,
    batch_size: int,
) -> float:
    """Fill `inputs.views` with the frozen groups' output of the training and validation images (each view), read
    from the feature cache or computed (across processes: each its share of the rows, all get the whole) -> the
    seconds spent computing."""
    forward, spent = inputs.forward, 0.0
    used = np.union1d(split.train, split.val)
    view_index = torch.full((len(images),), -1, dtype=torch.long)
    view_index[used] = torch.arange(len(used))
    inputs.view_index = view_index.to(forward.device)
    inputs.views = []
    for mirror in [False, True] if (config.flip or config.tta_flip) else [False]:
        key = feature_key(
            data=images.key, rows=used, arch=config.arch, weights=weights, cut=cut,
            preprocess=forward.preprocess, mirror=mirror, autocast=forward.autocast, device=forward.device,
        )  # fmt: skip
        cached = cache.get(key)
        if dist.any(cached is None):
            started = time.perf_counter()
            mine = used[dist.part(len(used))]
            rows = torch.from_numpy(mine).to(inputs.pixels.device)  # gathered chunk by chunk
            options = dict(batch_size=batch_size, device=forward.device, mirror=mirror, autocast=forward.autocast)
            cached = compute_features(forward.prefix, inputs.pixels, forward.preprocess, progress=config.progress,
                                      rows=rows, **options)  # fmt: skip
            if dist.any(not all(torch.isfinite(part).all() for part in cached.split(4096))):  # fp16 overflow
                cached = compute_features(forward.prefix, inputs.pixels, forward.preprocess, dtype=torch.float32,
                                          progress=False, rows=rows, **options)  # fmt: skip
            cached = dist.gather_rows(cached, len(used))
            if dist.main:
                cache.put(key, cached)
            spent += time.perf_counter() - started
        inputs.views.append(cached.to(forward.device))
    forward.feature_dtype = inputs.views[0].dtype  # what inference rounds the frozen groups' output to
    return spent
