"""Device and precision policy, in one place: which device a run computes on, whether it computes under bf16
autocast, where its images live and how large a chunk of a no-gradient pass is."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_autocast(amp: str, device: torch.device) -> bool:
    """Whether a run computes under bf16 autocast: `amp = "on"`, or `"auto"` on CUDA."""
    return amp == "on" or (amp == "auto" and device.type == "cuda")


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on `device` for the images, or None where it computes on host memory (the CPU): then the images
    stay where they are, memory-mapped."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def inference_batch_size(device: torch.device, resolution: int, batch_size: int = 0) -> int:
    """Images per chunk of a pass without gradients (the feature pass, validation, evaluate, predict). On a CPU about
    half a million input pixels, so a chunk's activations stay in the caches: measured with SqueezeNet (BENCHMARKS.md),
    a chunk that size runs up to twice as fast as 500 images at 96-224 px. On CUDA, large chunks: at least the training
    batch and 500 (not measured yet)."""
    if device.type == "cpu":
        return max(16, min(512, 2**19 // resolution**2))
    return max(batch_size, 500)
