"""Per-epoch side effects of a run, each a hook the loop calls (Lightning's Callback): recording the run folder
(checkpoints, metrics.json, state.pt, and resuming from it), tracking (MLflow, TensorBoard), and stopping early
(a study's pruner). The loop itself writes nothing."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.backbone import check_head
from ..scoring.selection import epoch_tie
from ..scoring.stats import percent
from .checkpoint import Checkpoint
from .loop import calibrate
from .run import Run, environment
from .rundir import BEST, METRICS, STATE, RunDir, RunState
from .tracking import Tracker


class Hook:
    def on_fit_start(self, run: Run, state: RunState) -> None:
        pass

    def on_epoch_end(self, run: Run, state: RunState, row: dict) -> bool | None:
        """After an epoch is recorded in `state`; True stops the run there."""

    def on_fit_end(self, run: Run, state: RunState) -> None:
        pass


# ------------------------------------------------------------------------------ the run folder
class Recording(Hook):
    """Writes what a run records (rank 0; the other processes keep the same record): at the first epoch the folder's
    config, split and digests (an earlier run's results it replaces are removed then, not before); each epoch
    metrics.json and state.pt; best.pt whenever the metric improves; at each recorded epoch and at the end, the best
    checkpoint with its temperature (fitted before metrics.json says finished: a run killed in between is not taken
    for finished without it)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.calibration: dict | None = None  # temperature scaling of the last checkpoint written with one
        self.setup_seconds: float | None = None  # model, preprocessing, feature pass: set by the caller
        self.starting = False  # this process has yet to write the run's first epoch

    def resume(self, run: Run, saved: dict | None) -> RunState:
        """A killed run continues from its state.pt (RunDir.read_state) when it belongs to this run."""
        path = self.run_dir.path / STATE
        if saved is None:
            return RunState()
        if saved.get("identity") != run.data.identity or saved["epoch"] >= run.config.epochs:
            run.log(f"starting over: {path} belongs to another run (replaced)")
            return RunState()
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        run.generator.set_state(saved["generator"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], run.device)
        run.log(f"resuming from epoch {saved['epoch']} ({path})")
        checkpoints = {int(e): Path(p) for e, p in saved["checkpoints"].items()}
        return RunState(saved["epoch"], saved["history"], saved["best"], saved["best_state"], checkpoints)

    def on_fit_start(self, run: Run, state: RunState) -> None:
        self.starting = run.dist.main  # the first epoch written replaces what an earlier run left

    def on_epoch_end(self, run: Run, state: RunState, row: dict) -> None:
        config, write, epoch = run.config, run.dist.main, row["epoch"]
        last = epoch == config.epochs
        if write and self.starting:
            self.run_dir.start(config.to_dict(), run.split, run.images.digests())
            self.starting = False
        if state.best is row and not last and write:  # the last is written below, with its temperature
            self.checkpoint(run, state).save(self.run_dir.best)
        if last or epoch in config.record_epochs:
            self.calibration = calibrate(run, state)
        if last and write:
            self.checkpoint(run, state, self.calibration).save(self.run_dir.best)
        elif epoch in config.record_epochs and not last:
            path = self.run_dir.epoch_checkpoint(epoch)
            if write:
                self.checkpoint(run, state, self.calibration).save(path)
            state.checkpoints[epoch] = path
        if write:
            self.run_dir.write_metrics(self.metrics(run, state))
            self.run_dir.save_state(self.state(run, state))

    def on_fit_end(self, run: Run, state: RunState) -> None:
        if state.epoch == run.config.epochs and run.dist.main:  # metrics.json says finished: a rerun returns it
            self.run_dir.drop_state()

    def checkpoint(self, run: Run, state: RunState, calibration: dict | None = None) -> Checkpoint:
        c, best, images, preprocess = run.config, state.best, run.images, run.forward.preprocess
        feature_dtype = run.forward.feature_dtype
        return Checkpoint(
            arch=c.arch, head=check_head(run.data.backbone, c.head), dropout=c.dropout, classes=list(images.classes),
            model=state.best_state,
            resize_policy=images.resize_policy, storage_size=images.storage_size, stored_side=images.stored_side,
            resolution=c.resolution, mean=list(preprocess.mean), std=list(preprocess.std), cut=run.cut,
            crop_fraction=c.crop_fraction, interpolation=c.interpolation,
            feature_dtype=str(feature_dtype).removeprefix("torch.") if feature_dtype else None,
            autocast=run.forward.autocast, loss=c.loss, label_smoothing=c.label_smoothing, tta_flip=c.tta_flip,
            epoch=best["epoch"], metric=c.metric, val_accuracy=best["val_accuracy"], val_loss=best["val_loss"],
            config=c.to_dict(), weights=run.weights_source, data=images.key,
            environment=environment(run.device, run.dist),
            temperature=calibration["temperature"] if calibration else 1.0, calibration=calibration,
            directory=os.getcwd(),
        )  # fmt: skip

    def metrics(self, run: Run, state: RunState) -> dict:
        """metrics.json: the run's record."""
        config, best, images, split = run.config, state.best, run.images, run.split
        tie = epoch_tie(state.history, config.metric)
        backbone = run.data.backbone
        pretrained = {"resolution": backbone.resolution, **dict(backbone.preprocessing)}
        return {
            "config": config.to_dict(),
            "classes": images.classes,
            "history": state.history,
            "metric": config.metric,
            "best_epoch": best["epoch"],
            "best_epoch_tie": tie.to_dict() if tie else None,
            "best_val_accuracy": best["val_accuracy"],
            "best_val_loss": best["val_loss"],
            "input_path": run.inputs.path,
            "setup_seconds": self.setup_seconds,  # model, preprocessing, feature pass (feature_seconds of it)
            "feature_seconds": run.feature_seconds,
            "weights": run.weights_source,
            # the preprocessing as used, beside the backbone's pretrained one (timm's pretrained_cfg) to compare
            "preprocessing": {
                **run.forward.preprocess.identity(),
                "resize_policy": images.resize_policy,
                "pretrained": pretrained,
            },  # fmt: skip
            "data": images.key,
            "stored_side": images.stored_side,
            "duplicates": images.duplicates,  # paths dropped: they named an image already listed
            "n_train": len(split.train),
            "n_val": len(split.val),
            "n_test": len(split.test),
            "class_counts": run.data.class_counts,
            "class_weights": dict(zip(images.classes, run.class_weights)) if run.class_weights else None,
            "environment": environment(run.device, run.dist),
            "command": " ".join(sys.argv),
            "identity": run.data.identity,
            "finished": state.epoch == config.epochs,
            "checkpoints": {e: p.name for e, p in state.checkpoints.items()},
            "calibration": self.calibration,  # temperature scaling of the last checkpoint written with one
        }

    def state(self, run: Run, state: RunState) -> dict:
        """state.pt: what `resume` needs to continue the run as if it had never stopped."""
        return {
            "identity": run.data.identity,
            "epoch": state.epoch,
            "history": state.history,
            "best": state.best,
            "best_state": state.best_state,
            "checkpoints": {e: str(p) for e, p in state.checkpoints.items()},
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generator": run.generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
        }


# ------------------------------------------------------------------------------ the console
class EpochLines(Hook):
    """A line per epoch that stays on screen (fastai's table), through the run's log: train and validation loss and
    accuracy, the learning rate, the epoch's seconds; "best" marks the epoch the run keeps. Accuracies carry no digit
    finer than the Wilson interval of their images allows."""

    HEADER = f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'val loss':>8}  {'val acc':>7}  {'lr':>8}  {'s':>6}"

    def __init__(self):
        self.header_shown = False

    def on_epoch_end(self, run: Run, state: RunState, row: dict) -> None:
        if not self.header_shown:  # under the run's opening lines, above its first epoch
            run.log(self.HEADER)
            self.header_shown = True
        n_train, n_val = len(run.split.train), len(run.split.val)
        run.log(
            f"{row['epoch']:>5}  {row['train_loss']:>10.4f}  {_share(row['train_accuracy'], n_train):>9}  "
            f"{row['val_loss']:>8.4f}  {_share(row['val_accuracy'], n_val):>7}  {row['lr']:>8.2e}  "
            f"{row['seconds']:>6.1f}" + ("  best" if state.best is row else "")
        )


def _share(p: float, n: int) -> str:
    return percent(round(p * n), n) if n else "-"


# ------------------------------------------------------------------------------ tracking and stopping
class Tracking(Hook):
    """The run's settings, each epoch's row and its files, to MLflow and TensorBoard (tracking.py; rank 0)."""

    def __init__(self, tracker: Tracker, run_dir: RunDir):
        self.tracker, self.run_dir = tracker, run_dir

    def on_fit_start(self, run: Run, state: RunState) -> None:
        self.tracker.start(run.config)

    def on_epoch_end(self, run: Run, state: RunState, row: dict) -> None:
        self.tracker.log_epoch(row)

    def on_fit_end(self, run: Run, state: RunState) -> None:
        self.tracker.finish({BEST: self.run_dir.best, METRICS: self.run_dir.path / METRICS})


class Stopping(Hook):
    """`on_epoch(row)` after each recorded epoch; True stops the run there (a study's pruner, a search's trial)."""

    def __init__(self, on_epoch: Callable[[dict], bool | None]):
        self.on_epoch = on_epoch

    def on_epoch_end(self, run: Run, state: RunState, row: dict) -> bool | None:
        return self.on_epoch(row)
