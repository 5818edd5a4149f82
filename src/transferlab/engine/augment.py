"""Training augmentations beyond crops and flips, batched on the device: RandomResizedCrop, RandAugment /
TrivialAugment, mixup / cutmix.

The policies and the mixing are torchvision.transforms.v2's tensor implementations (timm's RandAugment works on one
PIL image at a time, and its Mixup draws from NumPy's global generator). They draw from torch's global generator, so
each call runs inside `drawn_from`, which seeds a forked copy of it from the run's augmentation generator: a run's
augmentations depend on its seed alone, and nothing outside changes.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2

POLICY_CHUNK = 8  # a policy draws one op (and magnitude) per call: each chunk of this many images draws its own
RRC_RATIO = (3 / 4, 4 / 3)  # timm's and torchvision's RandomResizedCrop aspect range


@contextlib.contextmanager
def drawn_from(generator: torch.Generator):
    """Run torchvision's random draws from a forked CPU generator seeded by `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def policy(name: str) -> v2.Transform | None:
    """The auto-augment policy `name` (RunConfig.auto_augment), None for none."""
    return {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}.get(name, lambda: None)()


def apply_policy(pixels: torch.Tensor, transform: v2.Transform, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3), each chunk of POLICY_CHUNK images through its own draw."""
    x = pixels.permute(0, 3, 1, 2)
    with drawn_from(generator):
        x = torch.cat([transform(chunk) for chunk in x.split(POLICY_CHUNK)])
    return x.permute(0, 2, 3, 1)


def random_resized_crop(x: torch.Tensor, resolution: int, min_scale: float, generator: torch.Generator):
    """(N, C, S, S) float -> (N, C, resolution, resolution): per image a box of area share U(min_scale, 1) and
    log-uniform aspect in RRC_RATIO (clipped to the image, where timm would draw again), at a uniform place,
    bilinearly resampled (roi_align averages several samples per output pixel when the box is larger)."""
    n, _, h, w = x.shape
    draw = lambda: torch.rand(n, device=x.device, generator=generator)  # noqa: E731
    area = (min_scale + (1 - min_scale) * draw()) * h * w
    log_low, log_high = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draw())
    box_w = torch.sqrt(area * aspect).clamp(1, w)
    box_h = torch.sqrt(area / aspect).clamp(1, h)
    left, top = (w - box_w) * draw(), (h - box_h) * draw()
    boxes = torch.stack([torch.arange(n, device=x.device, dtype=x.dtype), left, top, left + box_w, top + box_h], 1)
    return roi_align(x, boxes.to(x.dtype), output_size=resolution, aligned=True)


class Mixing:
    """mixup and / or cutmix of a training batch and its labels -> (images, (N, K) soft targets). With both, each
    batch takes one of the two at random (timm's switch probability 0.5)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int):
        mixes = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + (
            [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else []
        )
        self.transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        with drawn_from(generator):
            return self.transform(x, y)


def mixing(config, num_classes: int) -> Mixing | None:
    return Mixing(config.mixup, config.cutmix, num_classes) if config.mixup or config.cutmix else None
