"""One training run: RunConfig -> per-epoch metrics, best checkpoint, run directory.

The whole data set sits on the training device as one uint8 tensor; batches are index
selections of it, preprocessed on the device. When the strategy leaves a prefix of the network
frozen and no random crop precedes it, that prefix runs once per image (features.py) and the
epochs train only the rest. Started by torchrun, one run spans its processes (distributed.py): each takes its
share of every batch, of the feature pass and of validation, and rank 0 writes the run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import Preprocess, dataset_statistics, random_crop
from .checkpoint import Checkpoint, read_torch_file
from .config import ConfigError, RunConfig
from .data import DataError, ImageSet, Split, load_images, split_for
from .distributed import SINGLE, Distributed, session
from .evaluate import balanced_scores, confusion_matrix, fit_temperature, scores, suffix_logits
from .features import FeatureCache, compute_features, feature_key, inference_batch_size
from .freezing import (
    active_groups,
    apply_freezing,
    frozen_prefix_length,
    parameter_groups,
    set_train_mode,
    trainable_groups,
)
from .fsutil import atomic_save, atomic_write_bytes, atomic_write_json, claimed, writable_folder
from .models import (
    build_model,
    check_head,
    check_resolution,
    get_backbone,
    group_modules,
    resolve_device,
    uses_autocast,
    weights_identity,
)
from .progress import bar, console
from .selection import epoch_tie, improves
from .tracking import make_tracker


# ------------------------------------------------------------------------------ small helpers
def environment(device: torch.device) -> dict:
    import torchvision

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
    return info


def loss_function(
    config: RunConfig, num_classes: int, weight: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training criterion; `weight` (K,) weights each row by its class, normalised by the batch's weights as
    cross-entropy's `weight=` does."""
    if config.loss == "mse" and weight is not None:

        def weighted_mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            rows = (logits.float().softmax(1) - F.one_hot(y, num_classes).float()).pow(2).mean(1)
            return (rows * weight[y]).sum() / weight[y].sum()

        return weighted_mse
    if config.loss == "mse":  # the study's: squared error between softmax and one-hot labels
        return lambda logits, y: F.mse_loss(logits.float().softmax(1), F.one_hot(y, num_classes).float())
    return lambda logits, y: F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=config.label_smoothing)


def split_class_counts(images: ImageSet, split: Split) -> dict[str, dict[str, int]]:
    """Images per class in each part of a split: {"train": {class: n}, "val": ..., "test": ...}."""
    test = images.labels[split.test]
    if split.official_test:
        test = images.test_labels if images.test_labels is not None else np.zeros(0, dtype=np.int64)
    parts = {"train": images.labels[split.train], "val": images.labels[split.val], "test": test}
    k = len(images.classes)
    return {name: dict(zip(images.classes, np.bincount(y, minlength=k).tolist())) for name, y in parts.items()}


def balanced_class_weights(train_counts: list[int]) -> list[float]:
    """sklearn's compute_class_weight("balanced"): n_samples / (n_classes * count of the class)."""
    n, k = sum(train_counts), len(train_counts)
    return [n / (k * c) for c in train_counts]


def make_optimizer(config: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
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


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on `device` for the images, or None where it computes on host memory (the CPU): then the images
    stay where they are, memory-mapped."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class TrainingError(RuntimeError):
    """A run cannot go on (its loss is no longer finite); the message is one line."""


class RunFolderError(ConfigError):
    """--out holds another run's results, or another process is training there (message is one line)."""


class RunBusyError(RunFolderError):
    """Another process is training in the run folder now."""


RUN_LOCK = ".lock"  # held by the process training in a run folder
DIGESTS = "digests.npz"  # the training and validation images' pixel hashes (ImageSet.digests)


def identity_difference(theirs: dict, mine: dict) -> str:
    """What tells two runs' identities apart, in words: "lr 0.001 there, 0.01 here", "the data", "the split"."""
    old, new = theirs.get("config") or {}, mine.get("config") or {}
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "unset") != new.get(k, "unset")]
    parts = [f"{k} {old.get(k, 'unset')!r} there, {new.get(k, 'unset')!r} here" for k in keys[:3]]
    parts += [f"{len(keys) - 3} more settings"] if len(keys) > 3 else []
    parts += [f"the {k}" for k in ("data", "split") if theirs.get(k) != mine.get(k) and not keys]
    return "; ".join(parts) or "a run written by another version"


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of an epoch of n images. A last batch of one image joins the batch before it:
    BatchNorm cannot train on one image of a 1x1 map, and one image's gradient would be a step of its own."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


# ------------------------------------------------------------------------------ results


@dataclass
class RunResult:
    out_dir: Path
    history: list[dict]
    best_epoch: int
    metric: str
    feature_path: str
    checkpoints: dict[int, Path] = field(default_factory=dict)  # recorded epoch -> best checkpoint up to it
    stopped: bool = False  # on_epoch stopped it before its last epoch (history and best.pt: the epochs trained)
    n_val: int | None = None  # validation images: what its accuracies are proportions of

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1]

    @property
    def best_val_accuracy(self) -> float:
        return self.best["val_accuracy"]

    def at_epoch(self, epoch: int) -> dict:
        """Metrics as a run of `epoch` epochs would report them (best checkpoint chosen within them)."""
        rows = self.history[:epoch]
        best = None
        for row in rows:
            best = row if improves(row, best, self.metric) else best
        tie = epoch_tie(rows, self.metric)
        return {"epochs": epoch, "history": rows, "best_epoch": best["epoch"], "best": best,
                "tie": tie.to_dict() if tie else None}  # fmt: skip


@dataclass
class RunState:
    """Where a run stands after its last finished epoch; saved as state.pt so a killed run resumes there."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None  # the best epoch's weights (CPU)
    checkpoints: dict[int, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the run
class Trainer:
    """Holds the model, data and caches for one run; `fit()` runs it. Build with `Trainer(config, out_dir)`."""

    def __init__(
        self,
        config: RunConfig,
        out_dir: str | Path | None,
        *,
        images: ImageSet | None = None,
        feature_cache: FeatureCache | None = None,
        log: Callable[[str], None] | None = None,
        dist: Distributed = SINGLE,
        overwrite: bool = False,
    ):
        # one of several processes (torchrun, distributed.py): rank 0 alone logs, draws bars, tracks and writes
        self.dist = dist
        self.overwrite = overwrite  # may replace another run's results in out_dir (else refused in one line)
        if not dist.main:
            config, log = dataclasses.replace(config, progress=False, log=[]), lambda text: None
        self.config = config = config.resolved()  # the backbone's defaults where the config leaves them unset
        self.log = log or (lambda text: console.print(text, highlight=False))
        self.device = dist.device(resolve_device(config.device))
        self.backbone = get_backbone(config.arch)
        check_resolution(config.arch, config.resolution)
        check_head(self.backbone, config.head)
        self.trainable = trainable_groups(self.backbone, config.strategy, config.unfreeze)
        # None: a run that writes nothing (the lr range test, lr_find.py); fit() needs a folder
        self.out_dir = self._output_folder(out_dir, "--out") if out_dir is not None else None
        cache = self._output_folder(config.resolved_cache_dir(), "cache folder (--cache-dir)")
        writable_folder(cache, "cache folder (--cache-dir)", ConfigError)
        with dist.main_first():  # rank 0 decodes and caches the images; the others then read its cache
            self.images = images if images is not None else load_images(config)
        self.split = split_for(self.images, config)
        self.class_counts = split_class_counts(self.images, self.split)
        if dist.active and min(len(self.split.train), len(self.split.val)) < dist.world_size:
            raise ConfigError(
                f"{len(self.split.train)} training and {len(self.split.val)} validation images cannot be shared "
                f"among {dist.world_size} processes: each needs at least one of each"
            )
        empty = [c for c, n in self.class_counts["train"].items() if n == 0]
        for option in ("class_weights", "sampler"):
            if getattr(config, option) == "balanced" and empty:  # its weight would be n / 0
                raise ConfigError(f"{option} = 'balanced': class {empty[0]!r} has no training images to balance")
        if self.out_dir is not None:  # created only once the data is known to be usable
            writable_folder(self.out_dir, "--out", ConfigError)
        self.feature_cache = (
            feature_cache if feature_cache is not None else FeatureCache(config.resolved_cache_dir() / "features")
        )
        self.num_classes = len(self.images.classes)
        self.calibration: dict | None = None
        self._replaces: list[Path] = []  # another run's result files, removed when this run writes its first epoch
        self._starting = False  # fit: this process has yet to write the run's first epoch
        # one-off work, kept apart from the epochs; setup_seconds stays None when fit finds the run finished
        self.setup_seconds: float | None = None
        self.feature_seconds = 0.0

    def _output_folder(self, folder: str | Path, what: str) -> Path:
        """A folder this run writes in (--out, the cache): writable, and outside the data folder, where a new
        folder would be read as a class (checked before anything is created)."""
        data = Path(self.config.data).expanduser()
        target = Path(folder).expanduser()
        if self.config.data != "cifar10" and data.is_dir() and target.resolve().is_relative_to(data.resolve()):
            raise ConfigError(f"{what} {target} lies inside the data folder {data}: its files would be read as data")
        return target

    # -------------------------------------------------------------- setup
    def _setup(self) -> None:
        config, device = self.config, self.device
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        # Augmentation draws from the same generator as the epoch's order in one process; across processes the
        # order must be the same everywhere and the augmentation each process's own (reseeded in start_epoch)
        self.augment_generator = torch.Generator(device=device) if self.dist.active else self.generator
        self.model, self.weights_source = build_model(
            config.arch, self.num_classes, weights=config.weights, head=config.head, dropout=config.dropout
        )
        apply_freezing(self.model, self.backbone, self.trainable)
        self._check_batchnorm()
        # channels_last: faster convolutions on CUDA and, measured here, on CPU too (oneDNN)
        self.model.to(device, memory_format=torch.channels_last)
        self.autocast = uses_autocast(config.amp, device)
        if config.normalize == "dataset":
            mean, std = dataset_statistics(self.images.images, self.split.train)
            flat = [name for name, value in zip(("red", "green", "blue"), std) if value == 0]
            if flat:  # dividing by a zero std would make every input NaN
                raise DataError(
                    f"normalize = dataset: the {flat[0]} channel is the same in every training image (std 0); "
                    "use --normalize imagenet"
                )
        else:
            mean, std = self.backbone.mean, self.backbone.std
        self.preprocess = Preprocess(
            mean, std, config.resolution, config.crop_padding, config.flip, channels_last=True,
            crop_fraction=config.crop_fraction, interpolation=config.interpolation,
        )  # fmt: skip
        self.inference_batch = inference_batch_size(device, config.resolution, config.batch_size)
        self.cut = frozen_prefix_length(self.backbone, self.trainable)
        self.prefix, self.suffix = self.backbone.split(self.model, self.cut)
        trained = self.dist.wrap(self.suffix, find_unused=config.gradual_unfreeze > 0)  # DDP across processes
        self.step_suffix = torch.compile(trained) if config.compile else trained
        train_counts = list(self.class_counts["train"].values())
        self.class_weights = balanced_class_weights(train_counts) if config.class_weights == "balanced" else None
        weight = torch.tensor(self.class_weights, device=device) if self.class_weights else None
        self.loss_fn = loss_function(config, self.num_classes, weight)
        self.loss_weight = weight
        groups = parameter_groups(self.model, self.backbone, self.trainable, config.lr, config.lr_group_decay)
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.optimizer = make_optimizer(config, groups)
        self.labels = torch.from_numpy(self.images.labels).to(device)
        if config.sampler == "balanced":  # the training split grouped by class, to draw a class then one of its images
            train_idx = torch.from_numpy(self.split.train).to(device)
            self.by_class = train_idx[torch.argsort(self.labels[train_idx], stable=True)]
            self.class_size = torch.tensor(train_counts, device=device)
            self.class_start = torch.cumsum(self.class_size, 0) - self.class_size
        self._choose_input_path()

    def _check_batchnorm(self) -> None:
        """Batches of one image cannot train BatchNorm (batch_bounds merges a last one; batch_size 1 is refused)."""
        if self.config.batch_size > 1 and len(self.split.train) > 1:
            return
        batchnorm = torch.nn.modules.batchnorm._BatchNorm
        norms = [name for name, modules in group_modules(self.model, self.backbone) if name in self.trainable
                 for m in modules for sub in m.modules() if isinstance(sub, batchnorm)]  # fmt: skip
        if norms and len(self.split.train) < 2:
            raise ConfigError(
                f"the training split holds {len(self.split.train)} image: the trainable group {norms[0]} has "
                "BatchNorm, which cannot train on one image; add training images"
            )
        if norms:
            raise ConfigError(
                f"batch_size = {self.config.batch_size}: the trainable group {norms[0]} has BatchNorm, which cannot "
                "train on one image; use a batch size of 2 or more"
            )

    def _choose_input_path(self) -> None:
        """Cached prefix activations when valid, else the uint8 images on the device."""
        config = self.config
        if self.cut == 0:
            self.feature_path, reason = "images", "nothing is frozen"
        elif config.cache_features == "off":
            self.feature_path, reason = "images", "cache_features = off"
        elif config.crop_padding:
            self.feature_path = "images"
            reason = f"random crop (crop_padding = {config.crop_padding}) changes the frozen prefix's input every epoch"
        else:
            self.feature_path = "cached"
            reason = f"groups {', '.join(self.backbone.group_names[: self.cut])} are frozen and see no random crop"
            if config.flip or config.tta_flip:
                reason += "; mirrored views cached too, so flips stay exact"
        self.log(f"input path: {self.feature_path} ({reason})")
        self.pixels = self._place_pixels()
        self.feature_dtype = None
        if self.feature_path == "cached":
            used = np.union1d(self.split.train, self.split.val)
            self.view_index = torch.full((len(self.images),), -1, dtype=torch.long)
            self.view_index[used] = torch.arange(len(used))
            self.view_index = self.view_index.to(self.device)
            mirrors = [False, True] if (config.flip or config.tta_flip) else [False]
            self.views = [self._cached_view(used, m) for m in mirrors]
            self.feature_dtype = self.views[0].dtype

    def _place_pixels(self) -> torch.Tensor:
        """The uint8 images as one tensor: on the CPU the (memory-mapped) array itself, no copy; on CUDA the whole
        tensor on the device when it fits in free memory (with a quarter to spare), else left on the host and moved
        a batch at a time (_batch_pixels; `self.streamed`)."""
        pixels = torch.from_numpy(self.images.images)
        free = free_device_memory(self.device)
        self.streamed = free is not None and pixels.nbytes >= 0.75 * free
        if free is None:
            return pixels
        if not self.streamed:
            return pixels.to(self.device)
        self.log(
            f"images stay in host memory ({pixels.nbytes / 2**30:.1f} GiB; the device has {free / 2**30:.1f} free)"
        )
        return pixels

    def _batch_pixels(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.streamed:
            return self.pixels[idx]
        return self.pixels[idx.cpu()].to(self.device, non_blocking=True)

    def _cached_view(self, used: np.ndarray, mirror: bool) -> torch.Tensor:
        config = self.config
        key = feature_key(
            data=self.images.key,
            rows=used,
            arch=config.arch,
            weights=weights_identity(config.arch, config.weights, seed=config.seed),
            cut=self.cut,
            preprocess=self.preprocess,
            mirror=mirror,
            autocast=self.autocast,
            device=self.device,
        )
        cached = self.feature_cache.get(key)
        if self.dist.any(cached is None):  # across processes: each computes its share of the rows, all get the whole
            started = time.perf_counter()
            mine = used[self.dist.part(len(used))]
            pixels, rows = self.pixels, torch.from_numpy(mine).to(self.pixels.device)  # gathered chunk by chunk
            options = dict(batch_size=self.inference_batch, device=self.device, mirror=mirror, autocast=self.autocast)
            cached = compute_features(
                self.prefix, pixels, self.preprocess, progress=config.progress, rows=rows, **options
            )
            if self.dist.any(not all(torch.isfinite(part).all() for part in cached.split(4096))):  # fp16 overflow
                cached = compute_features(
                    self.prefix, pixels, self.preprocess, dtype=torch.float32, progress=False, rows=rows, **options
                )
            cached = self.dist.gather_rows(cached, len(used))
            if self.dist.main:
                self.feature_cache.put(key, cached)
            self.feature_seconds += time.perf_counter() - started
        return cached.to(self.device)

    # -------------------------------------------------------------- forward passes
    def _inputs(self, idx: torch.Tensor, *, train: bool, mirror: bool = False) -> torch.Tensor:
        if self.feature_path == "cached":
            rows = self.view_index[idx]
            if train and self.config.flip:
                flip = torch.rand(len(idx), device=self.device, generator=self.augment_generator) < 0.5
                x = self.views[0][rows]
                x[flip] = self.views[1][rows[flip]]  # gather the mirrored rows only where the coin says so
            else:
                x = self.views[1 if mirror else 0][rows]
            x = x.float()
        else:
            x = self.preprocess(self._batch_pixels(idx), train=train, generator=self.augment_generator, mirror=mirror)
            if self.cut:
                with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    x = self.prefix(x)
        if train and self.config.feature_shift:
            # zeros, not reflection: a ReLU map is zero where nothing fires, and a 1x1 map has nothing to reflect
            x = random_crop(x, self.config.feature_shift, self.augment_generator, mode="constant")
        return x

    def _logits(self, idx: torch.Tensor, *, train: bool, mirror: bool = False) -> torch.Tensor:
        x = self._inputs(idx, train=train, mirror=mirror)
        return suffix_logits(self.step_suffix if train else self.suffix, x, autocast=self.autocast)

    @torch.no_grad()
    def validation_logits(self, indices: np.ndarray) -> torch.Tensor:
        """(V, N, K) float32 logits of these images as validation computes them, V = 2 under flip TTA."""
        self.model.eval()
        whole, indices = len(indices), indices[self.dist.part(len(indices))]  # across processes: a share each
        batch, out = self.inference_batch, []
        for start in range(0, len(indices), batch):
            idx = torch.from_numpy(indices[start : start + batch]).to(self.device)
            mirrors = (False, True) if self.config.tta_flip else (False,)
            out.append(torch.stack([self._logits(idx, train=False, mirror=m) for m in mirrors]))
        return self.dist.gather_rows(torch.cat(out, 1), whole, dim=1)  # every process: all the rows, in order

    def evaluate_indices(self, indices: np.ndarray) -> dict:
        """Validation, scored by the same code as `evaluate` (evaluate.scores)."""
        y = self.labels[torch.from_numpy(indices).to(self.device)]
        config = self.config
        return scores(self.validation_logits(indices), y, self.images.classes, loss=config.loss,
                      label_smoothing=config.label_smoothing)  # fmt: skip

    def calibrate(self, state: RunState) -> dict:
        """Temperature scaling of the best checkpoint so far: T fitted on its validation logits where they can support
        one (evaluate.fit_temperature), else 1 and why. The model holds that epoch's weights for the pass, then its
        own again. Validation figures recorded per epoch stay uncalibrated."""
        current = None
        if state.best["epoch"] != state.epoch:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(state.best_state)
        logits = self.validation_logits(self.split.val)
        if current is not None:
            self.model.load_state_dict(current)
        y = self.labels[torch.from_numpy(self.split.val).to(self.device)]
        return {"epoch": state.best["epoch"], **fit_temperature(logits, y).to_dict()}

    # -------------------------------------------------------------- the loop
    def fit(self, on_epoch: Callable[[dict], bool | None] | None = None) -> RunResult:
        """Train (or resume, or return the finished run). `on_epoch(row)` is called after each epoch is recorded;
        when it returns True the run stops there, resumable from its state.pt, and the result says `stopped`.
        One process trains in a run folder at a time (a lock that ends with the process, however it ends)."""
        if not self.dist.main:  # rank 0 holds the folder for all the processes of one run
            return self._fit(on_epoch)
        with claimed(self.out_dir / RUN_LOCK) as mine:
            if not mine:
                raise RunBusyError(
                    f"--out {self.out_dir}: another process is training in this folder now; wait for it to finish "
                    "or choose another --out"
                )
            return self._fit(on_epoch)

    def _fit(self, on_epoch) -> RunResult:
        config = self.config
        finished = self.dist.broadcast(self._finished() if self.dist.main else None)  # rank 0 reads for all
        if finished is not None:  # nothing to compute: not even the model or the feature cache
            self.log(f"already finished ({self.out_dir / 'metrics.json'})")
            if self.dist.main:
                (self.out_dir / "state.pt").unlink(missing_ok=True)  # left by a kill just before the end
            return finished
        saved = self._read_state()
        if self.dist.main:
            self._refuse_other_run(saved)
        tracker = make_tracker(config, self.out_dir)  # before the setup: a missing package fails at once
        # one-off work, kept out of the per-epoch `seconds` (training + validation only)
        started = time.perf_counter()
        self._setup()
        self.setup_seconds = time.perf_counter() - started
        state = self._resume(saved)
        if not self.dist.agree(state.epoch):  # every process read state.pt; none writes before all have
            raise TrainingError(f"the processes read {self.out_dir / 'state.pt'} differently: run again")
        self._starting = self.dist.main  # the first epoch written replaces what an earlier run left
        env = self._environment()
        n_train = len(self.split.train)
        tracker.start(config)
        if state.epoch < config.epochs:
            self.log(
                f"training {config.arch} ({config.strategy}: {', '.join(self.trainable)}) on {n_train} images, "
                f"validating on {len(self.split.val)}, {config.epochs} epochs at {config.resolution}px, "
                f"device {self.device}"
            )
        with bar(
            config.epochs * n_train,
            f"{config.strategy} {config.resolution}px",
            unit="img",
            enabled=config.progress and state.epoch < config.epochs,
        ) as progress:
            progress.advance(state.epoch * n_train)
            for epoch in range(state.epoch + 1, config.epochs + 1):
                started = time.perf_counter()
                train_loss, train_accuracy, train_balanced = self._train_epoch(epoch, progress)
                val = self.evaluate_indices(self.split.val)
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_accuracy": train_accuracy,
                    "train_balanced_accuracy": train_balanced["balanced_accuracy"],
                    "train_macro_f1": train_balanced["macro_f1"],
                    "val_loss": val["loss"],
                    "val_accuracy": val["accuracy"],
                    "val_balanced_accuracy": val["balanced_accuracy"],
                    "val_macro_f1": val["macro_f1"],
                    "seconds": time.perf_counter() - started,
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                self._check_finite(row, state)
                self._end_epoch(state, row, env)
                tracker.log_epoch(row)
                progress.info(
                    f"epoch {epoch}/{config.epochs} loss {train_loss:.3f} acc {train_accuracy:.3f} "
                    f"val {row['val_accuracy']:.3f}"
                )
                if on_epoch is not None and on_epoch(row) and epoch < config.epochs:
                    break
        stopped = state.epoch < config.epochs
        if not stopped and self.dist.main:  # metrics.json now says the run is finished (a rerun returns it)
            (self.out_dir / "state.pt").unlink(missing_ok=True)
        checkpoints = {**state.checkpoints, **({} if stopped else {config.epochs: self.out_dir / "best.pt"})}
        tracker.finish({"best.pt": self.out_dir / "best.pt", "metrics.json": self.out_dir / "metrics.json"})
        self.dist.barrier()  # no process returns before rank 0 has written the run's files
        return RunResult(self.out_dir, state.history, state.best["epoch"], config.metric, self.feature_path,
                         checkpoints, stopped, len(self.split.val))  # fmt: skip

    def _train_epoch(self, epoch: int, progress) -> tuple[float, float, dict]:
        """One epoch of len(train) images in a seeded random order -> (mean loss, accuracy, balanced_scores).
        Across processes every one draws the same order, takes its share of each batch and the sums are added up,
        so the figures are those of the whole epoch."""
        config = self.config
        order = self.start_epoch(epoch)
        n = len(order)
        bounds = batch_bounds(n, config.batch_size)
        steps = len(bounds)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        confusion = torch.zeros(self.num_classes, self.num_classes, device=self.device, dtype=torch.long)
        for step, (start, stop) in enumerate(bounds):
            batch = order[start:stop]
            idx, share = self._share(batch)
            counted = len(idx)
            if not counted:  # too small a batch to reach this process: it steps with the others (DDP needs every
                # process in every step) on one image, weighted 0 and in eval mode: no BatchNorm statistics, no dropout
                idx, training = batch[:1], [m for m in self.model.modules() if m.training]
                self.model.eval()
            lr = lr_factor(config, (epoch - 1) * steps + step, steps)
            loss, logits = self.train_step(idx, lr, scale=share * self.dist.world_size)
            if not counted:
                for module in training:
                    module.training = True
            y, pred = self.labels[idx[:counted]], logits[:counted].argmax(1)
            loss_sum += loss * (share * len(batch))
            correct += (pred == y).sum()
            confusion += confusion_matrix(y, pred, self.num_classes)
            progress.advance(len(batch))
        for total in (loss_sum, correct, confusion):
            self.dist.all_sum(total)
        self.dist.average_buffers(self.model)
        return loss_sum.item() / n, correct.item() / n, balanced_scores(confusion)

    def _share(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This process's part of a batch, and its weight in the batch's loss: its share of the images (of their
        class weights, under class_weights), so the mean over processes of world_size x weight x its part's loss is
        the whole batch's loss, gradients included. A batch is shared among as many processes as it holds pairs of
        images (all of them unless batch_size / world_size < 2, or for an epoch's last, smaller batch): BatchNorm
        cannot train on one image of a 1x1 map. One process: the batch, 1."""
        if not self.dist.active:
            return batch, 1.0
        part = self.dist.part(len(batch), among=min(self.dist.world_size, max(1, len(batch) // 2)))
        if self.loss_weight is None:
            return batch[part], (part.stop - part.start) / len(batch)
        weights = self.loss_weight[self.labels[batch]]
        return batch[part], (weights[part].sum() / weights.sum()).item()

    def start_epoch(self, epoch: int) -> torch.Tensor:
        """Ready the model for training epoch `epoch` (which groups train, train or eval mode) -> the epoch's order
        of the training images: seeded, shuffled or drawn by the balanced sampler."""
        config = self.config
        # The prefix cut and the optimiser follow the strategy's full set of groups; gradual unfreezing only
        # withholds gradients from the deeper ones (the optimiser skips parameters without a gradient).
        active = active_groups(self.trainable, epoch, config.gradual_unfreeze)
        apply_freezing(self.model, self.backbone, active)
        set_train_mode(self.model, self.backbone, active)
        if self.dist.active:  # dropout and augmentation: each process's own draws (the order stays common)
            seed = self.dist.seed(config.seed, epoch)
            torch.manual_seed(seed)
            self.augment_generator.manual_seed(seed)
        train_idx = torch.from_numpy(self.split.train).to(self.device)
        n = len(train_idx)
        if config.sampler == "balanced":
            # A uniform class, then a uniform image of it: each image drawn with probability proportional to
            # 1 / its class's count, with replacement. Two draws of n rather than torch.multinomial over the images,
            # whose number of categories is capped at 2**24.
            c = torch.randint(self.num_classes, (n,), device=self.device, generator=self.generator)
            u = torch.rand(n, device=self.device, generator=self.generator, dtype=torch.float64)
            within = (u * self.class_size[c]).long().clamp_max(self.class_size[c] - 1)
            return self.by_class[self.class_start[c] + within]
        return train_idx[torch.randperm(n, device=self.device, generator=self.generator)]

    def train_step(self, idx: torch.Tensor, factor: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on the training images `idx`, each parameter group at `factor` times its peak lr ->
        the batch's loss and logits (detached). The only training step: epochs and the lr range test (lr_find.py)
        both take it. `scale` multiplies the loss whose gradient is taken (a process's weight in a shared batch;
        DDP then averages the processes' gradients)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        logits = self._logits(idx, train=True)
        loss = self.loss_fn(logits, self.labels[idx])
        self.optimizer.zero_grad(set_to_none=True)
        (loss if scale == 1.0 else loss * scale).backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def _check_finite(self, row: dict, state: RunState) -> None:
        bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(row[k])]
        if bad:
            kept = f"best.pt holds epoch {state.best['epoch']}" if state.best else "no checkpoint was saved"
            raise TrainingError(
                f"epoch {row['epoch']}: {bad[0].replace('_', ' ')} is {row[bad[0]]}: the run diverged and is stopped "
                f"({kept}); lower lr or check the data"
            )

    def _end_epoch(self, state: RunState, row: dict, env: dict) -> None:
        """Record the epoch: history, the best checkpoint by the selection metric, recorded epochs, state.pt.
        Across processes each keeps the same record (the metrics are the whole run's) and rank 0 writes it."""
        config = self.config
        write = self.dist.main
        state.epoch = row["epoch"]
        state.history.append(row)
        last = row["epoch"] == config.epochs
        if write and self._starting:
            self._start_outputs()
        if improves(row, state.best, config.metric):
            state.best = row
            state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            if not last and write:  # written below with its temperature
                self._checkpoint(state).save(self.out_dir / "best.pt")
        # a run's end (and each recorded epoch, the end of a shorter run) fits the temperature of its best checkpoint,
        # before metrics.json says finished: a run killed in between is not taken for finished without it
        if last or row["epoch"] in config.record_epochs:
            self.calibration = self.calibrate(state)
        if last and write:
            self._checkpoint(state, self.calibration).save(self.out_dir / "best.pt")
        elif row["epoch"] in config.record_epochs and not last:
            path = self.out_dir / f"best-epoch{row['epoch']}.pt"
            if write:
                self._checkpoint(state, self.calibration).save(path)
            state.checkpoints[row["epoch"]] = path
        if write:
            self._write_metrics(state, env)
            self._save_state(state)

    # -------------------------------------------------------------- what a run directory holds
    def _start_outputs(self) -> None:
        """Before the run writes its first result: an earlier run's results it replaces (--overwrite) are removed,
        so no file outlives its config, and this run's config.json and split.json are written. Done at the first
        epoch's end, not before: a run that fails earlier leaves the folder as it found it."""
        for path in self._replaces:
            path.unlink(missing_ok=True)
        self._replaces = []
        atomic_write_json(self.config.to_dict(), self.out_dir / "config.json", "run config")
        atomic_write_json(self.split.to_dict(), self.out_dir / "split.json", "split")
        digests = self.images.digests()  # evaluate tells the run's training images among any other data by them
        buffer = io.BytesIO()
        np.savez(buffer, train=digests[self.split.train], val=digests[self.split.val])
        atomic_write_bytes(buffer.getvalue(), self.out_dir / DIGESTS, "image digests")
        self._starting = False

    def _refuse_other_run(self, saved: dict | None) -> None:
        """--out holding another run's results (a metrics.json or state.pt of other settings, data or split) is
        refused in one line naming the difference, unless this run may overwrite them (then they are replaced when
        it writes its first epoch)."""
        mine = self._identity()
        theirs, what = None, None
        try:
            metrics = json.loads((self.out_dir / "metrics.json").read_text())
            theirs = metrics.get("identity") if isinstance(metrics, dict) else None
            what = "a finished run" if isinstance(metrics, dict) and metrics.get("finished") else "an unfinished run"
            if not isinstance(theirs, dict):
                theirs, what = {}, "a metrics.json written by no transferlab run of this version"
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            theirs, what = {}, "an unreadable metrics.json"
        if theirs == mine or theirs is None:
            if saved is None or saved.get("identity") == mine:
                foreign = [name for name in ("config.json", "split.json", "best.pt") if (self.out_dir / name).exists()]
                if theirs is not None or not foreign:
                    return
                theirs, what = {}, f"files of no transferlab run ({', '.join(foreign)})"
            else:
                theirs, what = saved.get("identity") or {}, "a killed run's state.pt"
        difference = identity_difference(theirs, mine) if theirs else "not a transferlab run's"
        if not self.overwrite:
            raise RunFolderError(
                f"--out {self.out_dir} holds {what} with other settings ({difference}): pass --overwrite to replace "
                "it, or choose another --out"
                if theirs
                else f"--out {self.out_dir} holds {what}: pass --overwrite to replace them, or choose another --out"
            )
        self.log(f"replacing {what} in {self.out_dir} ({difference})")
        self._replaces = [self.out_dir / name for name in ("best.pt", "metrics.json", "state.pt", "config.json",
                                                           "split.json")]  # fmt: skip
        self._replaces += list(self.out_dir.glob("best-epoch*.pt"))

    def _write_metrics(self, state: RunState, env: dict) -> None:
        best = state.best
        atomic_write_json(
            {
                "config": self.config.to_dict(),
                "classes": self.images.classes,
                "history": state.history,
                "metric": self.config.metric,
                "best_epoch": best["epoch"],
                "best_epoch_tie": tie.to_dict() if (tie := epoch_tie(state.history, self.config.metric)) else None,
                "best_val_accuracy": best["val_accuracy"],
                "best_val_loss": best["val_loss"],
                "input_path": self.feature_path,
                "setup_seconds": self.setup_seconds,  # model, preprocessing, feature pass (feature_seconds of it)
                "feature_seconds": self.feature_seconds,
                "weights": self.weights_source,
                "preprocessing": self._preprocessing(),
                "data": self.images.key,
                "stored_side": self.images.stored_side,
                "duplicates": self.images.duplicates,  # paths dropped: they named an image already listed
                "n_train": len(self.split.train),
                "n_val": len(self.split.val),
                "n_test": len(self.split.test),
                "class_counts": self.class_counts,
                "class_weights": dict(zip(self.images.classes, self.class_weights)) if self.class_weights else None,
                "environment": env,
                "command": " ".join(sys.argv),
                "identity": self._identity(),
                "finished": state.epoch == self.config.epochs,
                "checkpoints": {e: p.name for e, p in state.checkpoints.items()},
                # temperature scaling of the last checkpoint written with one (best.pt once finished)
                "calibration": self.calibration,
            },
            self.out_dir / "metrics.json",
        )

    def _environment(self) -> dict:
        """The machine, and how many processes trained (recorded only for more than one)."""
        return {**environment(self.device), **self.dist.describe()}

    def _preprocessing(self) -> dict:
        """The preprocessing as used, beside the backbone's pretrained one (timm's pretrained_cfg) to compare."""
        pretrained = {"resolution": self.backbone.resolution, **dict(self.backbone.preprocessing)}
        return {**self.preprocess.identity(), "resize_policy": self.images.resize_policy, "pretrained": pretrained}

    def _checkpoint(self, state: RunState, calibration: dict | None = None) -> Checkpoint:
        c, best = self.config, state.best
        return Checkpoint(
            arch=c.arch, head=check_head(self.backbone, c.head), dropout=c.dropout, classes=list(self.images.classes),
            model=state.best_state,
            resize_policy=self.images.resize_policy, storage_size=self.images.storage_size,
            stored_side=self.images.stored_side,
            resolution=c.resolution, mean=list(self.preprocess.mean), std=list(self.preprocess.std), cut=self.cut,
            crop_fraction=c.crop_fraction, interpolation=c.interpolation,
            feature_dtype=str(self.feature_dtype).removeprefix("torch.") if self.feature_dtype else None,
            autocast=self.autocast, loss=c.loss, label_smoothing=c.label_smoothing, tta_flip=c.tta_flip,
            epoch=best["epoch"], metric=c.metric, val_accuracy=best["val_accuracy"], val_loss=best["val_loss"],
            config=c.to_dict(), weights=self.weights_source, data=self.images.key,
            environment=self._environment(), temperature=calibration["temperature"] if calibration else 1.0,
            calibration=calibration,
        )  # fmt: skip

    # -------------------------------------------------------------- resuming a killed run
    def _identity(self) -> dict:
        """What state.pt must match to be resumed: the settings, the data and the split."""
        split = hashlib.sha256(repr(sorted(self.split.to_dict().items())).encode()).hexdigest()
        return {"config": self.config.training_dict(), "data": self.images.key, "split": split}

    def _save_state(self, state: RunState) -> None:
        saved = {
            "identity": self._identity(),
            "epoch": state.epoch,
            "history": state.history,
            "best": state.best,
            "best_state": state.best_state,
            "checkpoints": {e: str(p) for e, p in state.checkpoints.items()},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        atomic_save(saved, self.out_dir / "state.pt", "resume state")

    def _read_state(self) -> dict | None:
        """state.pt as saved, or None (absent, or unreadable: then the run starts over and says so)."""
        path = self.out_dir / "state.pt"
        if not path.exists():
            return None
        try:
            saved = read_torch_file(path, "state", RuntimeError)
        except RuntimeError as error:
            self.log(f"starting over: {error}")
            return None
        return saved if isinstance(saved, dict) and "epoch" in saved else None

    def _resume(self, saved: dict | None) -> RunState:
        """A killed run continues from its state.pt (read by _read_state) when it belongs to this run."""
        path = self.out_dir / "state.pt"
        if saved is None:
            return RunState()
        if saved.get("identity") != self._identity() or saved["epoch"] >= self.config.epochs:
            self.log(f"starting over: {path} belongs to another run (replaced)")
            return RunState()
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        self.generator.set_state(saved["generator"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        self.log(f"resuming from epoch {saved['epoch']} ({path})")
        checkpoints = {int(e): Path(p) for e, p in saved["checkpoints"].items()}
        return RunState(saved["epoch"], saved["history"], saved["best"], saved["best_state"], checkpoints)

    def _finished(self) -> RunResult | None:
        """The result of this very run (same identity) when its directory holds it finished."""
        try:
            metrics = json.loads((self.out_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        if not (metrics.get("finished") and metrics.get("identity") == self._identity()):
            return None
        history = metrics["history"]
        checkpoints = {int(e): self.out_dir / name for e, name in metrics.get("checkpoints", {}).items()}
        if not all(p.is_file() for p in [self.out_dir / "best.pt", *checkpoints.values()]):
            return None
        checkpoints[self.config.epochs] = self.out_dir / "best.pt"
        return RunResult(self.out_dir, history, metrics["best_epoch"], self.config.metric, metrics["input_path"],
                         checkpoints, n_val=len(self.split.val))  # fmt: skip


def train(config: RunConfig, out_dir: str | Path, **kwargs) -> RunResult:
    """Library entry point: `transferlab.train(RunConfig(...), "runs/x")`. Started by torchrun, one run across its
    processes (distributed.py); otherwise one process."""
    with session(config.device, config.batch_size) as dist:
        return Trainer(config, out_dir, dist=dist, **kwargs).fit()
