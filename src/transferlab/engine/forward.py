"""THE forward path of a trained network, from uint8 pixels to probabilities (airbench's one `infer`).

pixels -> preprocessing -> the frozen groups (the prefix), under the run's precision, rounded to the dtype the
feature cache holds -> the trainable groups and head (the suffix) -> logits of each view (the image, and its mirror
under flip TTA) -> probabilities (scoring.calibration: the views' mean softmax, scaled by the temperature).

Validation during training, `evaluate`, `predict` and the study's test evaluation run `Forward`; export traces the
same two functions, `prefix_output` and `suffix_logits`, in float32 (inference/export.py), and the feature cache
fills itself with `prefix_output` (engine/features.py). Training takes its own batches through the same prefix and
suffix (engine/inputs.py, engine/loop.py), with its augmentations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..scoring.calibration import view_probabilities
from .device import inference_batch_size
from .preprocess import Preprocess


def prefix_output(prefix: nn.Module, x: torch.Tensor, *, autocast: bool, feature_dtype: torch.dtype | None):
    """The frozen groups' output as training used it: computed in the run's precision and, where training read it
    from the feature cache, rounded to the cache's dtype (returned as float32 for the suffix)."""
    if autocast:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            h = prefix(x)
    else:  # no context at all: export traces this function
        h = prefix(x)
    return h.to(feature_dtype).float() if feature_dtype is not None else h


def suffix_logits(suffix: nn.Module, features: torch.Tensor, *, autocast: bool) -> torch.Tensor:
    """The trainable part on (cached or computed) frozen-group output, in the run's precision; float32 logits."""
    if not autocast:
        return suffix(features.float()).float()
    with torch.autocast(features.device.type, dtype=torch.bfloat16):
        return suffix(features.float()).float()


@dataclass
class Forward:
    prefix: nn.Module  # the groups that were frozen (their output cached) during training
    suffix: nn.Module
    preprocess: Preprocess
    autocast: bool  # bf16 autocast, as the run computed
    feature_dtype: torch.dtype | None  # the cached prefix output's dtype, or None when training computed it
    tta_flip: bool  # score the mean of the image's and its mirror's probabilities
    device: torch.device
    temperature: float = 1.0  # fitted on the validation split after training

    @property
    def mirrors(self) -> tuple[bool, ...]:
        return (False, True) if self.tta_flip else (False,)

    def features(self, pixels: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        """uint8 (N, H, W, 3) on the device -> the frozen groups' output of one view, as validation saw it."""
        with torch.no_grad():
            return prefix_output(self.prefix, self.preprocess(pixels, mirror=mirror), autocast=self.autocast,
                                 feature_dtype=self.feature_dtype)  # fmt: skip

    def logits(self, features: torch.Tensor, suffix: nn.Module | None = None) -> torch.Tensor:
        """Frozen-group output -> float32 logits (`suffix`: the trainable part as it is stepped, e.g. compiled)."""
        return suffix_logits(self.suffix if suffix is None else suffix, features, autocast=self.autocast)

    def chunk_view_logits(self, features_of: Callable[[bool], torch.Tensor]) -> torch.Tensor:
        """(V, N, K) logits of one chunk of images; `features_of(mirror)` gives a view's frozen-group output (computed
        from pixels, or read from the feature cache)."""
        return torch.stack([self.logits(features_of(mirror)) for mirror in self.mirrors])

    @torch.no_grad()
    def view_logits(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (V, N, K) float32 logits on the CPU, V = 2 under flip TTA (the mirror second),
        `batch_size` images at a time (default: device.inference_batch_size)."""
        batch_size = batch_size or inference_batch_size(self.device, self.preprocess.resolution)
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # Pillow's arrays are read-only; torch warns about those
        images = torch.as_tensor(images)
        out = []
        for start in range(0, max(len(images), 1), batch_size):  # no images: one empty batch, (V, 0, K) logits
            batch = images[start : start + batch_size].to(self.device)
            out.append(self.chunk_view_logits(lambda mirror, batch=batch: self.features(batch, mirror)).cpu())
        return torch.cat(out, 1)

    def probabilities(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None,
                      calibrated: bool = True) -> torch.Tensor:  # fmt: skip
        """uint8 (N, H, W, 3) -> (N, K) class probabilities (on the CPU), scaled by the temperature unless
        calibrated=False (then as validation computed them)."""
        return view_probabilities(self.view_logits(images, batch_size), self.temperature if calibrated else 1.0)
