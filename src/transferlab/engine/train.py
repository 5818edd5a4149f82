"""One training run, end to end: RunConfig -> per-epoch metrics, best checkpoint, run folder.

prepare_run (run.py)    settings checked, data decoded (cached) and split
RunDir (rundir.py)      the folder locked; a finished run returned as it is; another run's results refused
build_run (run.py)      model, preprocessing, optimiser, training inputs (the feature pass, cached)
Recording.resume        a killed run continues from its state.pt
fit (loop.py)           the epochs; hooks (hooks.py) record, track and stop them
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config.run import RunConfig
from ..data.imageset import ImageSet
from ..errors import TrainingError
from ..progress import console
from .distributed import SINGLE, Distributed, session
from .features import FeatureCache
from .hooks import EpochLines, Hook, Recording, Stopping, Tracking
from .loop import fit
from .run import build_run, prepare_run
from .rundir import METRICS, STATE, RunDir, RunResult
from .tracking import make_tracker


def run_training(
    config: RunConfig,
    out_dir: str | Path,
    *,
    images: ImageSet | None = None,
    feature_cache: FeatureCache | None = None,
    log: Callable[[str], None] | None = None,
    dist: Distributed = SINGLE,
    overwrite: bool = False,
    on_epoch: Callable[[dict], bool | None] | None = None,
    hooks: Sequence[Hook] = (),
) -> RunResult:
    """Train (or resume, or return the finished run) in `out_dir`. `on_epoch(row)` is called after each epoch is
    recorded; when it returns True the run stops there, resumable from its state.pt, and the result says `stopped`.
    `hooks`: more per-epoch side effects (hooks.Hook), called after the run's own. `overwrite`: another run's results
    in the folder are replaced (else refused in one line)."""
    log = (log or (lambda text: console.print(text, highlight=False))) if dist.main else (lambda text: None)
    data = prepare_run(config, out_dir, images=images, dist=dist)
    config, split = data.config, data.split
    run_dir = RunDir(data.out_dir, overwrite, log)
    sizes = dict(n_val=len(split.val), n_train=len(split.train))
    # rank 0 holds the folder for all the processes of one run
    with run_dir.locked() if dist.main else contextlib.nullcontext():
        finished = dist.broadcast(
            run_dir.finished(data.identity, config.epochs, config.metric, **sizes) if dist.main else None
        )
        if finished is not None:  # nothing to compute: not even the model or the feature cache
            log(f"already finished ({run_dir.path / METRICS})")
            if dist.main:
                run_dir.drop_state()  # left by a kill just before the end
            finished.num_classes = data.num_classes
            return finished
        saved = run_dir.read_state()
        if dist.main:
            run_dir.claim(data.identity, saved)
        tracker = make_tracker(config, run_dir.path)  # before the setup: a missing package fails at once
        started = time.perf_counter()  # one-off work, kept out of the per-epoch `seconds` (training + validation)
        run = build_run(data, dist=dist, feature_cache=feature_cache, log=log)
        recording = Recording(run_dir)
        recording.setup_seconds = time.perf_counter() - started
        state = recording.resume(run, saved)
        if not dist.agree(state.epoch):  # every process read state.pt; none writes before all have
            raise TrainingError(f"the processes read {run_dir.path / STATE} differently: run again")
        own = [recording, Tracking(tracker, run_dir), EpochLines()] + ([Stopping(on_epoch)] if on_epoch else [])
        fit(run, state, [*own, *hooks])
        stopped = state.epoch < config.epochs
        checkpoints = {**state.checkpoints, **({} if stopped else {config.epochs: run_dir.best})}
        dist.barrier()  # no process returns before rank 0 has written the run's files
        return RunResult(run_dir.path, state.history, state.best["epoch"], config.metric, run.inputs.path,
                         checkpoints, stopped, num_classes=data.num_classes, setup_seconds=recording.setup_seconds,
                         feature_seconds=run.feature_seconds, **sizes)  # fmt: skip


def train(config: RunConfig, out_dir: str | Path, **kwargs) -> RunResult:
    """Library entry point: `transferlab.train(RunConfig(...), "runs/x")`. Started by torchrun, one run across its
    processes (distributed.py); otherwise one process."""
    with session(config.device, config.batch_size) as dist:
        return run_training(config, out_dir, dist=dist, **kwargs)
