"""One training run: RunConfig -> per-epoch metrics, best checkpoint, run directory.

The whole data set sits on the training device as one uint8 tensor; batches are index
selections of it, preprocessed on the device. When the strategy leaves a prefix of the network
frozen and no random crop precedes it, that prefix runs once per image (features.py) and the
epochs train only the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
from .config import RunConfig
from .data import ImageSet, load_images, make_split
from .features import FeatureCache, compute_features, feature_key
from .freezing import (
    active_groups,
    apply_freezing,
    frozen_prefix_length,
    parameter_groups,
    set_train_mode,
    trainable_groups,
)
from .models import as_sequential, build_model, get_backbone
from .progress import bar, console

CHECKPOINT_FORMAT = "transferlab-checkpoint-1"


# ------------------------------------------------------------------------------ small helpers
def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def loss_function(config: RunConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if config.loss == "mse":  # the study's: squared error between softmax and one-hot labels
        return lambda logits, y: F.mse_loss(logits.float().softmax(1), F.one_hot(y, num_classes).float())
    return lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)


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


# ------------------------------------------------------------------------------ results
@dataclass
class RunResult:
    out_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_accuracy: float
    feature_path: str
    checkpoints: dict[int, Path] = field(default_factory=dict)  # recorded epoch -> best checkpoint up to it

    def at_epoch(self, epoch: int) -> dict:
        """Metrics as a run of `epoch` epochs would report them (best checkpoint chosen within them)."""
        rows = self.history[:epoch]
        best = max(rows, key=lambda r: r["val_accuracy"])
        return {"epochs": epoch, "history": rows, "best_epoch": best["epoch"], "best": best}


# ------------------------------------------------------------------------------ the run
class Trainer:
    """Holds the model, data and caches for one run; `fit()` runs it. Build with `Trainer(config)`."""

    def __init__(
        self,
        config: RunConfig,
        out_dir: str | Path,
        *,
        images: ImageSet | None = None,
        feature_cache: FeatureCache | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda text: console.print(text, highlight=False))
        self.device = resolve_device(config.device)
        self.images = images if images is not None else load_images(config)
        self.feature_cache = (
            feature_cache if feature_cache is not None else FeatureCache(config.resolved_cache_dir() / "features")
        )
        self.split = make_split(
            self.images.labels,
            test_fraction=config.test_fraction,
            val_fraction=config.val_fraction,
            seed=config.split_seed,
            limit=config.limit,
            official_test=config.official_test,
        )
        self.backbone = get_backbone(config.arch)
        self.num_classes = len(self.images.classes)

    # -------------------------------------------------------------- setup
    def _setup(self) -> None:
        config, device = self.config, self.device
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.model, self.weights_source = build_model(
            config.arch, self.num_classes, weights=config.weights, head=config.head, dropout=config.dropout
        )
        self.trainable = trainable_groups(self.backbone, config.strategy, config.unfreeze)
        apply_freezing(self.model, self.backbone, self.trainable)
        on_cuda = device.type == "cuda"
        # channels_last: faster convolutions on CUDA and, measured here, on CPU too (oneDNN)
        self.model.to(device, memory_format=torch.channels_last)
        self.autocast = config.amp == "on" or (config.amp == "auto" and on_cuda)
        if config.normalize == "dataset":
            mean, std = dataset_statistics(self.images.images[self.split.train])
        else:
            mean, std = self.backbone.mean, self.backbone.std
        self.preprocess = Preprocess(mean, std, config.resolution, config.crop_padding, config.flip, channels_last=True)
        self.cut = frozen_prefix_length(self.backbone, self.trainable)
        self.prefix = as_sequential(self.model, self.backbone, 0, self.cut)
        self.suffix = as_sequential(self.model, self.backbone, self.cut)
        self.step_suffix = torch.compile(self.suffix) if config.compile else self.suffix
        self.loss_fn = loss_function(config, self.num_classes)
        groups = parameter_groups(self.model, self.backbone, self.trainable, config.lr, config.lr_group_decay)
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.optimizer = make_optimizer(config, groups)
        self.labels = torch.from_numpy(self.images.labels).to(device)
        self._choose_input_path()

    def _choose_input_path(self) -> None:
        """Cached prefix activations when valid, else the uint8 images on the device."""
        config = self.config
        if self.cut == 0:
            self.feature_path, reason = "images", "nothing is frozen"
        elif config.cache_features == "off":
            self.feature_path, reason = "images", "cache_features = off"
        elif config.crop_padding:
            self.feature_path, reason = (
                "images",
                f"random crop (crop_padding = {config.crop_padding}) changes the frozen prefix's input every epoch",
            )
        else:
            self.feature_path, reason = (
                "cached",
                f"groups {', '.join(self.backbone.group_names[: self.cut])} are frozen and see no random crop",
            )
            if config.flip or config.tta_flip:
                reason += "; mirrored views cached too, so flips stay exact"
        self.log(f"input path: {self.feature_path} ({reason})")
        self.pixels = torch.from_numpy(self.images.images).to(self.device)
        if self.feature_path == "cached":
            used = np.union1d(self.split.train, self.split.val)
            self.view_index = torch.full((len(self.images),), -1, dtype=torch.long)
            self.view_index[used] = torch.arange(len(used))
            self.view_index = self.view_index.to(self.device)
            mirrors = [False, True] if (config.flip or config.tta_flip) else [False]
            self.views = [self._cached_view(used, m) for m in mirrors]

    def _cached_view(self, used: np.ndarray, mirror: bool) -> torch.Tensor:
        p = self.preprocess
        key = feature_key(
            self.images.key,
            self.config.arch,
            _weights_identity(self.config.weights),
            self.cut,
            p.resolution,
            p.mean,
            p.std,
            mirror,
            self.autocast,
            hashlib.sha256(used.tobytes()).hexdigest(),
        )
        cached = self.feature_cache.get(key)
        if cached is None:
            pixels = self.pixels[torch.from_numpy(used).to(self.device)]
            options = dict(
                batch_size=max(self.config.batch_size, 500), device=self.device, mirror=mirror, autocast=self.autocast
            )
            cached = compute_features(self.prefix, pixels, p, progress=self.config.progress, **options)
            if not all(
                torch.isfinite(part).all() for part in cached.split(4096)
            ):  # fp16 overflow: keep full precision instead
                cached = compute_features(self.prefix, pixels, p, dtype=torch.float32, progress=False, **options)
            self.feature_cache.put(key, cached)
        return cached.to(self.device)

    # -------------------------------------------------------------- forward passes
    def _inputs(self, idx: torch.Tensor, *, train: bool, mirror: bool = False) -> torch.Tensor:
        if self.feature_path == "cached":
            rows = self.view_index[idx]
            if train and self.config.flip:
                flip = torch.rand(len(idx), device=self.device, generator=self.generator) < 0.5
                x = self.views[0][rows]
                x[flip] = self.views[1][rows[flip]]  # gather the mirrored rows only where the coin says so
            else:
                x = self.views[1 if mirror else 0][rows]
            x = x.float()
        else:
            x = self.preprocess(self.pixels[idx], train=train, generator=self.generator, mirror=mirror)
            if self.cut:
                with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    x = self.prefix(x)
        if train and self.config.feature_shift:
            # zeros, not reflection: a ReLU map is zero where nothing fires, and a 1x1 map has nothing to reflect
            x = random_crop(x, self.config.feature_shift, self.generator, mode="constant")
        return x

    def _logits(self, idx: torch.Tensor, *, train: bool, mirror: bool = False) -> torch.Tensor:
        x = self._inputs(idx, train=train, mirror=mirror)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.step_suffix(x) if train else self.suffix(x)

    @torch.no_grad()
    def evaluate_indices(self, indices: np.ndarray) -> dict:
        self.model.eval()
        total_loss, correct, n = 0.0, 0, 0
        batch = max(self.config.batch_size, 500)
        for start in range(0, len(indices), batch):
            idx = torch.from_numpy(indices[start : start + batch]).to(self.device)
            logits = self._logits(idx, train=False).float()
            if self.config.tta_flip:
                logits = (logits.softmax(1) + self._logits(idx, train=False, mirror=True).float().softmax(1)).log()
            y = self.labels[idx]
            total_loss += self.loss_fn(logits, y).item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(idx)
        return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "n": n}

    # -------------------------------------------------------------- the loop
    def fit(self, on_epoch: Callable[[dict], None] | None = None) -> RunResult:
        config = self.config
        self._setup()
        atomic_write_json(config.to_dict(), self.out_dir / "config.json")
        atomic_write_json(self.split.to_dict(), self.out_dir / "split.json")
        train_idx = torch.from_numpy(self.split.train).to(self.device)
        steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
        record = sorted(set(config.record_epochs) | {config.epochs})
        history, best, best_state, start_epoch, checkpoints = self._resume(record)
        env = environment(self.device)
        self.log(
            f"training {config.arch} ({config.strategy}: {', '.join(self.trainable)}) "
            f"on {len(self.split.train)} images, validating on {len(self.split.val)}, "
            f"{config.epochs} epochs at {config.resolution}px, device {self.device}"
        )
        with bar(
            config.epochs * len(train_idx),
            f"{config.strategy} {config.resolution}px",
            unit="img",
            enabled=config.progress,
        ) as progress:
            progress.advance((start_epoch) * len(train_idx))
            for epoch in range(start_epoch + 1, config.epochs + 1):
                started = time.perf_counter()
                # The prefix cut and the optimiser follow the strategy's full set of groups; gradual unfreezing only
                # withholds gradients from the deeper ones (the optimiser skips parameters without a gradient).
                active = active_groups(self.trainable, epoch, config.gradual_unfreeze)
                apply_freezing(self.model, self.backbone, active)
                set_train_mode(self.model, self.backbone, active)
                order = train_idx[torch.randperm(len(train_idx), device=self.device, generator=self.generator)]
                loss_sum = torch.zeros((), device=self.device)
                correct = torch.zeros((), device=self.device, dtype=torch.long)
                for step in range(steps_per_epoch):
                    factor = lr_factor(config, (epoch - 1) * steps_per_epoch + step, steps_per_epoch)
                    for group in self.optimizer.param_groups:
                        group["lr"] = group["initial_lr"] * factor
                    idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                    logits = self._logits(idx, train=True)
                    y = self.labels[idx]
                    loss = self.loss_fn(logits, y)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    loss_sum += loss.detach() * len(idx)
                    correct += (logits.detach().argmax(1) == y).sum()
                    progress.advance(len(idx))
                val = self.evaluate_indices(self.split.val)
                row = {
                    "epoch": epoch,
                    "train_loss": loss_sum.item() / len(train_idx),
                    "train_accuracy": correct.item() / len(train_idx),
                    "val_loss": val["loss"],
                    "val_accuracy": val["accuracy"],
                    "seconds": time.perf_counter() - started,
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                history.append(row)
                if best is None or row["val_accuracy"] > best["val_accuracy"]:
                    best = row
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                    atomic_save(self._checkpoint(best_state, best, env), self.out_dir / "best.pt")
                if epoch in record and epoch != config.epochs:
                    path = self.out_dir / f"best-epoch{epoch}.pt"
                    atomic_save(self._checkpoint(best_state, best, env), path)
                    checkpoints[epoch] = path
                progress.info(
                    f"epoch {epoch}/{config.epochs} loss {row['train_loss']:.3f} acc {row['train_accuracy']:.3f} "
                    f"val {row['val_accuracy']:.3f}"
                )
                self._write_metrics(history, best, env)
                self._save_state(epoch, history, best, best_state, checkpoints)
                if on_epoch is not None:
                    on_epoch(row)
        checkpoints[config.epochs] = self.out_dir / "best.pt"
        (self.out_dir / "state.pt").unlink(missing_ok=True)
        return RunResult(self.out_dir, history, best["epoch"], best["val_accuracy"], self.feature_path, checkpoints)

    def _write_metrics(self, history, best, env) -> None:
        atomic_write_json(
            {
                "config": self.config.to_dict(),
                "classes": self.images.classes,
                "history": history,
                "best_epoch": best["epoch"],
                "best_val_accuracy": best["val_accuracy"],
                "input_path": self.feature_path,
                "weights": self.weights_source,
                "n_train": len(self.split.train),
                "n_val": len(self.split.val),
                "n_test": len(self.split.test),
                "environment": env,
                "command": " ".join(sys.argv),
            },
            self.out_dir / "metrics.json",
        )

    def _checkpoint(self, state, best, env) -> dict:
        c = self.config
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": c.arch,
            "classes": list(self.images.classes),
            "head": c.head,
            "dropout": c.dropout,
            "resolution": c.resolution,
            "mean": list(self.preprocess.mean),
            "std": list(self.preprocess.std),
            "loss": c.loss,
            "tta_flip": c.tta_flip,
            "model": state,
            "epoch": best["epoch"],
            "val_accuracy": best["val_accuracy"],
            "config": c.to_dict(),
            "weights": self.weights_source,
            "environment": env,
        }

    # -------------------------------------------------------------- resuming a killed run
    def _save_state(self, epoch, history, best, best_state, checkpoints) -> None:
        state = {
            "epoch": epoch,
            "history": history,
            "best": best,
            "best_state": best_state,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "checkpoints": {e: str(p) for e, p in checkpoints.items()},
            "config": self.config.to_dict(),
        }
        atomic_save(state, self.out_dir / "state.pt")

    def _resume(self, record):
        path = self.out_dir / "state.pt"
        if not path.exists():
            return [], None, None, 0, {}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable state means starting over, not failing
            return [], None, None, 0, {}
        if state.get("config") != self.config.to_dict() or state["epoch"] >= self.config.epochs:
            return [], None, None, 0, {}
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.log(f"resuming from epoch {state['epoch']} ({path})")
        return (
            state["history"],
            state["best"],
            state["best_state"],
            state["epoch"],
            {int(e): Path(p) for e, p in state["checkpoints"].items()},
        )


def _weights_identity(weights: str) -> str:
    """Cache keys change when a weights file changes."""
    path = Path(weights).expanduser()
    if weights not in ("imagenet", "none") and path.is_file():
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return weights


def train(config: RunConfig, out_dir: str | Path, **kwargs) -> RunResult:
    """Library entry point: `transferlab.train(RunConfig(...), "runs/x")`."""
    return Trainer(config, out_dir, **kwargs).fit()
