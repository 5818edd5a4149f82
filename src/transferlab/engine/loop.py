"""The training loop, top to bottom: an epoch's order, the one training step, validation through the run's forward
path, the temperature of the best checkpoint, and `fit`, which runs the epochs and calls the hooks (hooks.py) that
record, track and stop them."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import TrainingError
from ..models.freezing import active_groups, apply_freezing, set_train_mode
from ..progress import bar
from ..scoring.calibration import fit_temperature
from ..scoring.metrics import balanced_scores, confusion_matrix, scores
from ..scoring.selection import improves
from .forward import suffix_logits
from .run import Run, batch_bounds, lr_factor
from .rundir import RunState


# ------------------------------------------------------------------------------ training
def start_epoch(run: Run, epoch: int) -> torch.Tensor:
    """Ready the model for training epoch `epoch` (which groups train, train or eval mode) -> the epoch's order of the
    training images: seeded, shuffled or drawn by the balanced sampler."""
    config, device = run.config, run.device
    # The prefix cut and the optimiser follow the strategy's full set of groups; gradual unfreezing only withholds
    # gradients from the deeper ones (the optimiser skips parameters without a gradient).
    active = active_groups(run.data.trainable, epoch, config.gradual_unfreeze)
    apply_freezing(run.model, run.data.backbone, active)
    set_train_mode(run.model, run.data.backbone, active)
    if run.dist.active:  # dropout and augmentation: each process's own draws (the order stays common)
        seed = run.dist.seed(config.seed, epoch)
        torch.manual_seed(seed)
        run.augment_generator.manual_seed(seed)
    train_idx = torch.from_numpy(run.split.train).to(device)
    n = len(train_idx)
    if run.balanced is not None:
        # A uniform class, then a uniform image of it: each image drawn with probability proportional to 1 / its
        # class's count, with replacement. Two draws of n rather than torch.multinomial over the images, whose number
        # of categories is capped at 2**24.
        draw = run.balanced
        c = torch.randint(run.data.num_classes, (n,), device=device, generator=run.generator)
        u = torch.rand(n, device=device, generator=run.generator, dtype=torch.float64)
        within = (u * draw.class_size[c]).long().clamp_max(draw.class_size[c] - 1)
        return draw.by_class[draw.class_start[c] + within]
    return train_idx[torch.randperm(n, device=device, generator=run.generator)]


def train_step(run: Run, idx: torch.Tensor, factor: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the training images `idx`, each parameter group at `factor` times its peak lr -> the
    batch's loss and logits (detached). The only training step: epochs and the lr range test (lr_find.py) both take
    it. `scale` multiplies the loss whose gradient is taken (a process's weight in a shared batch; DDP then averages
    the processes' gradients)."""
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    x, targets = run.inputs.training_batch(idx, run.labels, run.config, run.augment_generator)
    logits = suffix_logits(run.step_suffix, x, autocast=run.forward.autocast)
    loss = run.loss_fn(logits, targets)
    run.optimizer.zero_grad(set_to_none=True)
    (loss if scale == 1.0 else loss * scale).backward()
    run.optimizer.step()
    return loss.detach(), logits.detach()


def share_of(run: Run, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This process's part of a batch, and its weight in the batch's loss: its share of the images (of their class
    weights, under class_weights), so the mean over processes of world_size x weight x its part's loss is the whole
    batch's loss, gradients included. A batch is shared among as many processes as it holds pairs of images (all of
    them unless batch_size / world_size < 2, or for an epoch's last, smaller batch): BatchNorm cannot train on one
    image of a 1x1 map. One process: the batch, 1."""
    dist = run.dist
    if not dist.active:
        return batch, 1.0
    part = dist.part(len(batch), among=min(dist.world_size, max(1, len(batch) // 2)))
    if run.loss_weight is None:
        return batch[part], (part.stop - part.start) / len(batch)
    weights = run.loss_weight[run.labels[batch]]
    return batch[part], (weights[part].sum() / weights.sum()).item()


def train_epoch(run: Run, epoch: int, progress) -> tuple[float, float, dict]:
    """One epoch of len(train) images in a seeded random order -> (mean loss, accuracy, balanced_scores). Across
    processes every one draws the same order, takes its share of each batch and the sums are added up, so the figures
    are those of the whole epoch."""
    config, device, k = run.config, run.device, run.data.num_classes
    order = start_epoch(run, epoch)
    n = len(order)
    bounds = batch_bounds(n, config.batch_size)
    steps = len(bounds)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(k, k, device=device, dtype=torch.long)
    for step, (start, stop) in enumerate(bounds):
        batch = order[start:stop]
        idx, share = share_of(run, batch)
        counted = len(idx)
        if not counted:  # too small a batch to reach this process: it steps with the others (DDP needs every process
            # in every step) on one image, weighted 0 and in eval mode: no BatchNorm statistics, no dropout
            idx, training = batch[:1], [m for m in run.model.modules() if m.training]
            run.model.eval()
        lr = lr_factor(config, (epoch - 1) * steps + step, steps)
        loss, logits = train_step(run, idx, lr, scale=share * run.dist.world_size)
        if not counted:
            for module in training:
                module.training = True
        y, pred = run.labels[idx[:counted]], logits[:counted].argmax(1)
        loss_sum += loss * (share * len(batch))
        correct += (pred == y).sum()
        confusion += confusion_matrix(y, pred, k)
        progress.advance(len(batch))
    for total in (loss_sum, correct, confusion):
        run.dist.all_sum(total)
    run.dist.average_buffers(run.model)
    return loss_sum.item() / n, correct.item() / n, balanced_scores(confusion)


# ------------------------------------------------------------------------------ validation
@torch.no_grad()
def validation_logits(run: Run, indices: np.ndarray) -> torch.Tensor:
    """(V, N, K) float32 logits of these images through the run's forward path (V = 2 under flip TTA), the frozen
    groups' output read from the feature cache where training read it. Across processes each computes a share and
    every process gets all the rows, in order."""
    run.model.eval()
    whole, indices = len(indices), indices[run.dist.part(len(indices))]
    out = []
    for start in range(0, len(indices), run.inference_batch):
        idx = torch.from_numpy(indices[start : start + run.inference_batch]).to(run.device)
        out.append(run.forward.chunk_view_logits(lambda mirror, idx=idx: run.inputs.features(idx, mirror)))
    return run.dist.gather_rows(torch.cat(out, 1), whole, dim=1)


def validate(run: Run, indices: np.ndarray) -> dict:
    """Validation, scored by the same code as `evaluate` (scoring.metrics.scores)."""
    y = run.labels[torch.from_numpy(indices).to(run.device)]
    return scores(validation_logits(run, indices), y, run.images.classes, loss=run.config.loss,
                  label_smoothing=run.config.label_smoothing)  # fmt: skip


def calibrate(run: Run, state: RunState) -> dict:
    """Temperature scaling of the best checkpoint so far: T fitted on its validation logits where they can support one
    (scoring.calibration.fit_temperature), else 1 and why. The model holds that epoch's weights for the pass, then
    its own again. Validation figures recorded per epoch stay uncalibrated."""
    current = None
    if state.best["epoch"] != state.epoch:
        current = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        run.model.load_state_dict(state.best_state)
    logits = validation_logits(run, run.split.val)
    if current is not None:
        run.model.load_state_dict(current)
    y = run.labels[torch.from_numpy(run.split.val).to(run.device)]
    return {"epoch": state.best["epoch"], **fit_temperature(logits, y).to_dict()}


# ------------------------------------------------------------------------------ the epochs
def check_finite(row: dict, state: RunState) -> None:
    bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(row[k])]
    if bad:
        kept = f"best.pt holds epoch {state.best['epoch']}" if state.best else "no checkpoint was saved"
        raise TrainingError(
            f"epoch {row['epoch']}: {bad[0].replace('_', ' ')} is {row[bad[0]]}: the run diverged and is stopped "
            f"({kept}); lower lr or check the data"
        )


def record_epoch(run: Run, state: RunState, row: dict) -> None:
    """The epoch joins the history; when it is the best so far by the selection metric, its weights are kept."""
    state.epoch = row["epoch"]
    state.history.append(row)
    if improves(row, state.best, run.config.metric):
        state.best = row
        state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}


def fit(run: Run, state: RunState, hooks: Sequence = ()) -> RunState:
    """Train from `state` (a fresh one, or a killed run's) to config.epochs. After each epoch the hooks record it, in
    order; one returning True from `on_epoch_end` stops the run there (resumable from its state.pt)."""
    config, n_train = run.config, len(run.split.train)
    for hook in hooks:
        hook.on_fit_start(run, state)
    if state.epoch < config.epochs:
        run.log(
            f"training {config.arch} ({config.strategy}: {', '.join(run.data.trainable)}) on {n_train} images, "
            f"validating on {len(run.split.val)}, {config.epochs} epochs at {config.resolution}px, device {run.device}"
        )
        if config.batch_size >= n_train > 1:  # the study's 250 on a folder of a few hundred photos
            run.log(f"note: batch size {config.batch_size} holds the whole training split ({n_train} images): one "
                    f"optimiser step per epoch; -b {max(1, n_train // 8)} would take 8")  # fmt: skip
    with bar(config.epochs * n_train, f"{config.strategy} {config.resolution}px", unit="img",
             enabled=config.progress and state.epoch < config.epochs) as progress:  # fmt: skip
        progress.advance(state.epoch * n_train)
        for epoch in range(state.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            train_loss, train_accuracy, train_balanced = train_epoch(run, epoch, progress)
            val = validate(run, run.split.val)
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
                "lr": run.optimizer.param_groups[0]["lr"],
            }
            check_finite(row, state)
            record_epoch(run, state, row)
            stop = [hook.on_epoch_end(run, state, row) for hook in hooks]
            if any(stop) and epoch < config.epochs:
                break
    for hook in hooks:
        hook.on_fit_end(run, state)
    return state
