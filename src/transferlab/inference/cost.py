"""What a trained run costs: parameters, FLOPs per image, training and inference throughput.

Recorded once per trained run (a study trial's user attr "cost"; derived trials reuse their run's):
  params, trainable_params   every parameter of the model / those the strategy trains (its full set of groups)
  flops                      one forward pass of one (1, 3, R, R) image in eval mode at the run's resolution,
                             counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add is 2 FLOPs)
  train_images_per_second    n_train * epochs trained / the epochs' seconds (training + validation, as recorded)
  inference_images_per_second  the full model in eval mode on the run's device: INFERENCE_WARMUP batches, then
                             up to INFERENCE_BATCHES timed batches of INFERENCE_BATCH images of random input at the
                             run's resolution (fewer when batches are slow: about INFERENCE_SECONDS of timing at
                             most, half that of warm-up); INFERENCE_BATCH / the median batch's seconds (robust to
                             other processes on shared cores)
The model is built from the run's config (arch, head, the strategy's trainable groups) with no pretrained weights:
the cost depends on the architecture, not on the weights, and a finished run needs no model of its own.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..config.run import RunConfig
from ..engine.device import resolve_device, uses_autocast
from ..models.freezing import apply_freezing, trainable_groups
from ..models.registry import get_backbone
from ..models.weights import build_model

INFERENCE_WARMUP = 3
INFERENCE_BATCHES = 5
INFERENCE_BATCH = 64
INFERENCE_SECONDS = 10.0


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those requiring gradients)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def flops_per_image(model: torch.nn.Module, resolution: int) -> int:
    """FLOPs of one forward pass of one image, the model in eval mode (restored after)."""
    from torch.utils.flop_counter import FlopCounterMode  # loaded when a cost is measured

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, resolution, resolution, device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_throughput(
    model: torch.nn.Module, resolution: int, device: torch.device, *, batch: int = INFERENCE_BATCH, autocast=False
) -> float:
    """Images per second of the model in eval mode on `device` (a short timed loop on random input)."""
    was_training = model.training
    model.eval()
    x = torch.rand(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            warm = time.perf_counter()
            for _ in range(INFERENCE_WARMUP):  # fewer when a batch is slow (a large model on a CPU)
                model(x)
                _sync(device)
                if time.perf_counter() - warm > INFERENCE_SECONDS / 2:
                    break
            times: list[float] = []
            while len(times) < INFERENCE_BATCHES and sum(times) <= INFERENCE_SECONDS:
                started = time.perf_counter()
                model(x)
                _sync(device)
                times.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
    middle = statistics.median(times)  # the median batch: a batch slowed by other processes on shared cores is not it
    return batch / middle if middle > 0 else float("nan")


def training_throughput(n_train: int, history: list[dict]) -> float | None:
    """Training images per second over the epochs trained: n_train * epochs / their seconds."""
    seconds = sum(row["seconds"] for row in history)
    return n_train * len(history) / seconds if history and seconds > 0 else None


def measure_cost(config: RunConfig, num_classes: int, n_train: int, history: list[dict]) -> dict:
    """The cost record of a run trained with `config` (see the module docstring)."""
    device = resolve_device(config.device)
    # a fresh model's initialisation and the random input draw from their own RNG state: the study's stays as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _measure(config, num_classes, n_train, history, device)


def _measure(config: RunConfig, num_classes: int, n_train: int, history: list[dict], device: torch.device) -> dict:
    backbone = get_backbone(config.arch)
    model, _ = build_model(config.arch, num_classes, weights="none", head=config.head, dropout=config.dropout)
    apply_freezing(model, backbone, trainable_groups(backbone, config.strategy, config.unfreeze))
    model.to(device, memory_format=torch.channels_last)
    total, trainable = parameter_counts(model)
    autocast = uses_autocast(config.amp, device)
    return {
        "arch": config.arch,
        "strategy": config.strategy,
        "resolution": config.resolution,
        "params": total,
        "trainable_params": trainable,
        "flops": flops_per_image(model, config.resolution),
        "n_train": n_train,
        "epochs": len(history),
        "train_images_per_second": training_throughput(n_train, history),
        "inference_images_per_second": inference_throughput(model, config.resolution, device, autocast=autocast),
        "inference_batch": INFERENCE_BATCH,
        "inference_device": str(device),
        "inference_bf16": autocast,
    }
