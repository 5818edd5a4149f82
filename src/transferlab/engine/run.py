"""A run, set up: `prepare_run` checks the config and reads the data (cheap: done before a finished run is found
finished), `build_run` makes the model, optimiser and training inputs. Both return typed records: nothing of a run
exists half-made.

The whole data set sits on the training device as one uint8 tensor; batches are index selections of it,
preprocessed on the device (inputs.py). Started by torchrun, a run spans its processes (distributed.py): each takes
its share of every batch, of the feature pass and of validation, and rank 0 writes the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.identity import fingerprint, identity
from ..config.run import RunConfig
from ..data.imageset import ImageSet
from ..data.sources import load_images
from ..data.split import Split, class_counts, split_for
from ..errors import ConfigError, DataError
from ..fsutil import writable_folder
from ..models.backbone import Backbone, check_head
from ..models.freezing import apply_freezing, frozen_prefix_length, group_modules, parameter_groups, trainable_groups
from ..models.registry import check_resolution, get_backbone, resolve
from ..models.weights import build_model, weights_identity
from ..progress import console
from .augment import mixing
from .device import free_device_memory, inference_batch_size, resolve_device, uses_autocast
from .distributed import SINGLE, Distributed
from .features import FeatureCache
from .forward import Forward
from .inputs import TrainingInputs, cached_views, input_path, place_pixels
from .preprocess import Preprocess, dataset_statistics

Log = Callable[[str], None]
RUN_IDENTITY_FORMAT = 2  # how a run's identity is written (rundir.identity_difference names a change of it)


# ------------------------------------------------------------------------------ the recipe's parts
def loss_function(config: RunConfig, num_classes: int, weight: torch.Tensor | None = None) -> Callable:
    """The training criterion (logits, targets) -> loss; `weight` (K,) weights each row by its class, normalised by
    the batch's weights as cross-entropy's `weight=` does. Targets are labels, or (N, K) probabilities under mixup /
    cutmix (which RunConfig refuses with class weights)."""
    if config.loss == "mse" and weight is not None:

        def weighted_mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            rows = (logits.float().softmax(1) - F.one_hot(y, num_classes).float()).pow(2).mean(1)
            return (rows * weight[y]).sum() / weight[y].sum()

        return weighted_mse
    if config.loss == "mse":  # the study's: squared error between softmax and one-hot labels

        def mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            target = y.float() if y.is_floating_point() else F.one_hot(y, num_classes).float()
            return F.mse_loss(logits.float().softmax(1), target)

        return mse
    return lambda logits, y: F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=config.label_smoothing)


def balanced_class_weights(train_counts: list[int]) -> list[float]:
    """sklearn's compute_class_weight("balanced"): n_samples / (n_classes * count of the class)."""
    n, k = sum(train_counts), len(train_counts)
    return [n / (k * c) for c in train_counts]


def make_optimizer(config: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)  # fmt: skip
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: RunConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based). constant/step ignore config.epochs."""
    epoch = step / steps_per_epoch
    warmup = config.warmup_epochs
    if config.schedule == "onecycle":
        warmup = warmup or 0.3 * config.epochs
    if warmup and epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    if config.schedule == "step":
        return 0.1 ** int(epoch // config.step_every)
    if config.schedule in ("cosine", "onecycle"):
        t = (epoch - warmup) / max(config.epochs - warmup, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) if config.schedule == "cosine" else max(0.0, 1 - t)
    return 1.0


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of an epoch of n images. A last batch of one image joins the batch before it:
    BatchNorm cannot train on one image of a 1x1 map, and one image's gradient would be a step of its own."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def environment(device: torch.device, dist: Distributed = SINGLE) -> dict:
    """The machine a run computed on, and how many processes trained (recorded only for more than one)."""
    import torchvision  # only its version: the models it holds are imported by models/torchvision.py

    info = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return {**info, **dist.describe()}


# ------------------------------------------------------------------------------ the data of a run
@dataclass(frozen=True)
class RunData:
    """A run's settings (its backbone's defaults filled in) and data, checked: everything known before any model."""

    config: RunConfig
    device: torch.device
    backbone: Backbone
    trainable: list[str]  # the groups the strategy trains
    images: ImageSet
    split: Split
    class_counts: dict[str, dict[str, int]]  # images per class in each split
    out_dir: Path | None  # None: a run that writes nothing (the lr range test)

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    @property
    def identity(self) -> dict:
        """What makes two runs one: the settings that change their numbers or records, the data and the split (what a
        run folder's state.pt and metrics.json must match to be resumed or reused)."""
        return {"config": identity(self.config, roles=("result", "record")), "data": self.images.key,
                "split": fingerprint(self.split.to_dict(), length=64), "format": RUN_IDENTITY_FORMAT}  # fmt: skip


def _output_folder(config: RunConfig, folder: str | Path, what: str) -> Path:
    """A folder a run writes in (--out, the cache): outside the data folder, where a new folder would be read as a
    class (checked before anything is created)."""
    data = Path(config.data).expanduser()
    target = Path(folder).expanduser()
    if config.data != "cifar10" and data.is_dir() and target.resolve().is_relative_to(data.resolve()):
        raise ConfigError(f"{what} {target} lies inside the data folder {data}: its files would be read as data")
    return target


def prepare_run(config: RunConfig, out_dir: str | Path | None = None, *, images: ImageSet | None = None,
                dist: Distributed = SINGLE) -> RunData:  # fmt: skip
    """Check a run's settings and read its data (decoded once, cached): every refusal a run can meet before it
    trains, in one line, before anything is created but the cache."""
    if not dist.main:  # rank 0 alone draws bars and tracks
        config = dataclasses.replace(config, progress=False, log=[])
    config = resolve(config)  # the backbone's defaults where the config leaves them unset
    device = dist.device(resolve_device(config.device))
    backbone = get_backbone(config.arch)
    check_resolution(config.arch, config.resolution)
    check_head(backbone, config.head)
    trainable = trainable_groups(backbone, config.strategy, config.unfreeze)
    out = _output_folder(config, out_dir, "--out") if out_dir is not None else None
    cache = _output_folder(config, config.resolved_cache_dir(), "cache folder (--cache-dir)")
    writable_folder(cache, "cache folder (--cache-dir)", ConfigError)
    with dist.main_first():  # rank 0 decodes and caches the images; the others then read its cache
        images = images if images is not None else load_images(config)
    split = split_for(images, config)
    counts = class_counts(images, split)
    if dist.active and min(len(split.train), len(split.val)) < dist.world_size:
        raise ConfigError(
            f"{len(split.train)} training and {len(split.val)} validation images cannot be shared among "
            f"{dist.world_size} processes: each needs at least one of each"
        )
    empty = [c for c, n in counts["train"].items() if n == 0]
    for option in ("class_weights", "sampler"):
        if getattr(config, option) == "balanced" and empty:  # its weight would be n / 0
            raise ConfigError(f"{option} = 'balanced': class {empty[0]!r} has no training images to balance")
    if out is not None:  # created only once the data is known to be usable
        writable_folder(out, "--out", ConfigError)
    return RunData(config, device, backbone, trainable, images, split, counts, out)


def _check_batchnorm(data: RunData, model: nn.Module) -> None:
    """Batches of one image cannot train BatchNorm (batch_bounds merges a last one; batch_size 1 is refused)."""
    n_train, batch_size = len(data.split.train), data.config.batch_size
    if batch_size > 1 and n_train > 1:
        return
    batchnorm = torch.nn.modules.batchnorm._BatchNorm
    norms = [name for name, modules in group_modules(model, data.backbone) if name in data.trainable
             for m in modules for sub in m.modules() if isinstance(sub, batchnorm)]  # fmt: skip
    if norms and n_train < 2:
        raise ConfigError(
            f"the training split holds {n_train} image: the trainable group {norms[0]} has BatchNorm, which cannot "
            "train on one image; add training images"
        )
    if norms:
        raise ConfigError(
            f"batch_size = {batch_size}: the trainable group {norms[0]} has BatchNorm, which cannot train on one "
            "image; use a batch size of 2 or more"
        )


# ------------------------------------------------------------------------------ the run, built
@dataclass
class BalancedDraw:
    """The training split grouped by class, to draw a class uniformly, then one of its images (sampler = balanced)."""

    by_class: torch.Tensor  # training indices, sorted by class
    class_size: torch.Tensor
    class_start: torch.Tensor


@dataclass
class Run:
    """Everything one run trains with. `forward` is the network's one inference path (validation, and later evaluate,
    predict and export through the checkpoint); `step_suffix` is its trainable part as the optimiser steps it
    (across processes DDP-wrapped, compiled on request)."""

    data: RunData
    dist: Distributed
    log: Log
    model: nn.Module
    weights_source: str  # where the starting weights came from
    forward: Forward
    cut: int  # the frozen prefix's length in groups
    step_suffix: nn.Module
    inputs: TrainingInputs
    loss_fn: Callable
    loss_weight: torch.Tensor | None  # each class's weight in the loss (class_weights = balanced)
    class_weights: list[float] | None
    optimizer: torch.optim.Optimizer
    labels: torch.Tensor  # every image's label, on the device
    generator: torch.Generator  # the epochs' order (and, in one process, augmentation)
    augment_generator: torch.Generator
    balanced: BalancedDraw | None
    inference_batch: int  # images per chunk of a pass without gradients
    feature_seconds: float = 0.0  # the feature pass

    @property
    def config(self) -> RunConfig:
        return self.data.config

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def split(self) -> Split:
        return self.data.split

    @property
    def images(self) -> ImageSet:
        return self.data.images


def build_run(data: RunData, *, dist: Distributed = SINGLE, feature_cache: FeatureCache | None = None,
              log: Log | None = None) -> Run:  # fmt: skip
    """The model (pretrained, frozen as the strategy says), preprocessing, loss, optimiser and training inputs of a
    run, seeded by config.seed. The order of the random draws is part of a run's reproducibility: keep it."""
    config, device, backbone = data.config, data.device, data.backbone
    log = log or (lambda text: console.print(text, highlight=False))
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    # Augmentation draws from the same generator as the epoch's order in one process; across processes the order
    # must be the same everywhere and the augmentation each process's own (reseeded in loop.start_epoch)
    augment_generator = torch.Generator(device=device) if dist.active else generator
    model, weights_source = build_model(config.arch, data.num_classes, weights=config.weights, head=config.head,
                                        dropout=config.dropout)  # fmt: skip
    apply_freezing(model, backbone, data.trainable)
    _check_batchnorm(data, model)
    # channels_last: faster convolutions on CUDA and, measured here, on CPU too (oneDNN)
    model.to(device, memory_format=torch.channels_last)
    autocast = uses_autocast(config.amp, device)
    if config.normalize == "dataset":
        mean, std = dataset_statistics(data.images.images, data.split.train)
        flat = [name for name, value in zip(("red", "green", "blue"), std) if value == 0]
        if flat:  # dividing by a zero std would make every input NaN
            raise DataError(
                f"normalize = dataset: the {flat[0]} channel is the same in every training image (std 0); "
                "use --normalize imagenet"
            )
    else:
        mean, std = backbone.mean, backbone.std
    preprocess = Preprocess(
        mean, std, config.resolution, config.crop_padding, config.flip, channels_last=True,
        crop_fraction=config.crop_fraction, interpolation=config.interpolation,
        random_resized_crop=config.random_resized_crop, auto_augment=config.auto_augment,
    )  # fmt: skip
    inference_batch = inference_batch_size(device, config.resolution, config.batch_size)
    cut = frozen_prefix_length(backbone, data.trainable)
    prefix, suffix = backbone.split(model, cut)
    forward = Forward(prefix, suffix, preprocess, autocast, None, config.tta_flip, device)
    trained = dist.wrap(suffix, find_unused=config.gradual_unfreeze > 0)  # DDP across processes
    step_suffix = torch.compile(trained) if config.compile else trained
    train_counts = list(data.class_counts["train"].values())
    class_weights = balanced_class_weights(train_counts) if config.class_weights == "balanced" else None
    weight = torch.tensor(class_weights, device=device) if class_weights else None
    groups = parameter_groups(model, backbone, data.trainable, config.lr, config.lr_group_decay)
    for g in groups:
        g["initial_lr"] = g["lr"]
    labels = torch.from_numpy(data.images.labels).to(device)
    balanced = None
    if config.sampler == "balanced":
        train_idx = torch.from_numpy(data.split.train).to(device)
        class_size = torch.tensor(train_counts, device=device)
        balanced = BalancedDraw(train_idx[torch.argsort(labels[train_idx], stable=True)], class_size,
                                torch.cumsum(class_size, 0) - class_size)  # fmt: skip
    path, reason = input_path(config, cut, backbone.group_names)
    log(f"input path: {path} ({reason})")
    pixels, streamed = place_pixels(data.images, device, free_device_memory(device), log)
    inputs = TrainingInputs(path, pixels, streamed, forward, mixing=mixing(config, data.num_classes))
    feature_seconds = 0.0
    if path == "cached":
        cache = feature_cache if feature_cache is not None else FeatureCache(config.resolved_cache_dir() / "features")
        weights = weights_identity(config.arch, config.weights, seed=config.seed)
        feature_seconds = cached_views(inputs, data.images, data.split, config=config, cut=cut, weights=weights,
                                       cache=cache, dist=dist, batch_size=inference_batch)  # fmt: skip
    return Run(data, dist, log, model, weights_source, forward, cut, step_suffix, inputs,
               loss_function(config, data.num_classes, weight), weight, class_weights,
               make_optimizer(config, groups), labels, generator, augment_generator, balanced, inference_batch,
               feature_seconds)  # fmt: skip
