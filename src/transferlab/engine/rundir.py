"""The run folder: every file one run writes or reads, named and read here only.

  metrics.json     the run's record, rewritten after each epoch: config, history, best epoch, identity, finished
  epochs.csv       its history, a row per epoch (epoch, losses, accuracies, seconds, lr): for a spreadsheet or pandas
  best.pt          the best epoch's checkpoint (engine/checkpoint.py), with its temperature once the run ends
  best-epochN.pt   the best checkpoint within the first N epochs (record_epochs: a shorter run's result)
  state.pt         where a killed run resumes (removed once the run is finished)
  config.json      the settings; split.json the split's rows; digests.npz the training and validation images' pixel
                   hashes (evaluate recognises the run's own images by them, wherever the files lie)
  .lock            held by the process training here

A folder holding another run's results is never silently replaced: `claim` refuses it in one line naming the
difference, or with `overwrite` lists the files to remove, and `start` removes them when the run writes its first
epoch (a run that fails before leaves the folder as it found it).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config.run import RunConfig
from ..data.split import Split
from ..errors import CheckpointError, RunBusyError, RunFolderError
from ..fsutil import (
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    checked_output_file,
    claimed,
    read_torch_file,
)
from ..scoring.selection import epoch_tie, improves
from ..scoring.stats import percent_with_interval

METRICS, EPOCHS, BEST, STATE, CONFIG, SPLIT, DIGESTS, LOCK = (
    "metrics.json", "epochs.csv", "best.pt", "state.pt", "config.json", "split.json", "digests.npz", ".lock"
)  # fmt: skip
RUN_FILES = (BEST, METRICS, EPOCHS, CONFIG, SPLIT, STATE, DIGESTS)  # what `--overwrite` replaces (and best-epoch*.pt)
MLFLOW_DB = "mlflow.db"  # --log mlflow's database in the run folder, without MLFLOW_TRACKING_URI (engine/tracking.py)
TRACKING_FILES = (MLFLOW_DB,)


def epoch_checkpoint_name(epoch: int) -> str:
    return f"best-epoch{epoch}.pt"


# ------------------------------------------------------------------------------ what a run records
@dataclass
class RunResult:
    out_dir: Path
    history: list[dict]
    best_epoch: int
    metric: str
    feature_path: str  # "cached" (the frozen groups' output) or "images"
    checkpoints: dict[int, Path] = field(default_factory=dict)  # recorded epoch -> best checkpoint up to it
    stopped: bool = False  # on_epoch stopped it before its last epoch (history and best.pt: the epochs trained)
    n_val: int | None = None  # validation images: what its accuracies are proportions of
    n_train: int | None = None
    num_classes: int | None = None
    setup_seconds: float | None = None  # model, preprocessing, feature pass (None: found finished, nothing done)
    feature_seconds: float | None = None  # the feature pass, of setup_seconds

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1]

    @property
    def best_val_accuracy(self) -> float:
        return self.best["val_accuracy"]

    def summary(self) -> str:
        """One line: the best epoch (and the tie it broke), its validation accuracy with its 95% interval."""
        best, n = self.best, self.n_val
        tie = epoch_tie(self.history, self.metric)
        return (f"best epoch {self.best_epoch} (by {self.metric}" + (f"; {tie.words('epochs')}" if tie else "")
                + f"): val accuracy {percent_with_interval(round(best['val_accuracy'] * n), n)} on {n} images, "
                f"val loss {best['val_loss']:.4f}")  # fmt: skip

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
    """Where a run stands after its last finished epoch; saved in state.pt so a killed run resumes there."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None  # the best epoch's weights (CPU)
    checkpoints: dict[int, Path] = field(default_factory=dict)


def identity_difference(theirs: dict, mine: dict) -> str:
    """What tells two runs' identities apart, in words: "lr 0.001 there, 0.01 here", "the data", "the split"."""
    if theirs.get("format") != mine.get("format"):
        return "written by another version of transferlab, which identified runs differently"
    # an option declared `added` is left out of an identity at its default (config/identity.py): that is its value
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.metadata.get("added")}
    old, new = {**defaults, **(theirs.get("config") or {})}, {**defaults, **(mine.get("config") or {})}
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "unset") != new.get(k, "unset")]
    parts = [f"{k} {old.get(k, 'unset')!r} there, {new.get(k, 'unset')!r} here" for k in keys[:3]]
    parts += [f"{len(keys) - 3} more settings"] if len(keys) > 3 else []
    parts += [f"the {k}" for k in ("data", "split") if theirs.get(k) != mine.get(k) and not keys]
    return "; ".join(parts) or "a run written by another version"


# ------------------------------------------------------------------------------ the folder
class RunDir:
    """One run's folder. Reading needs nothing but the path; writing is the training process's (rank 0's)."""

    def __init__(self, path: str | Path, overwrite: bool = False, log: Callable[[str], None] = lambda text: None):
        self.path = Path(path)
        self.overwrite = overwrite  # may replace another run's results (else refused in one line)
        self.log = log
        self._replaces: list[Path] = []  # another run's files, removed when this run writes its first epoch

    @property
    def best(self) -> Path:
        return self.path / BEST

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.path / epoch_checkpoint_name(epoch)

    # -------------------------------------------------------------- reading
    def metrics(self) -> dict | None:
        """metrics.json, or None when it is absent or unreadable."""
        try:
            metrics = json.loads((self.path / METRICS).read_text())
        except (OSError, ValueError):
            return None
        return metrics if isinstance(metrics, dict) else None

    def split(self) -> Split | None:
        """The run's split (split.json), or None when there is none."""
        try:
            return Split.from_dict(json.loads((self.path / SPLIT).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def digests(self) -> dict[str, np.ndarray] | None:
        """The training and validation images' pixel hashes (ImageSet.digests), or None (not recorded)."""
        try:
            with np.load(self.path / DIGESTS) as saved:
                return {part: saved[part] for part in ("train", "val")}
        except (OSError, ValueError, KeyError):
            return None

    def finished(self, identity: dict, epochs: int, metric: str, n_val: int, n_train: int) -> RunResult | None:
        """The result of this very run (same identity) when the folder holds it finished, its checkpoints intact."""
        metrics = self.metrics()
        if not (metrics and metrics.get("finished") and metrics.get("identity") == identity):
            return None
        checkpoints = {int(e): self.path / name for e, name in metrics.get("checkpoints", {}).items()}
        if not all(p.is_file() for p in [self.best, *checkpoints.values()]):
            return None
        checkpoints[epochs] = self.best
        return RunResult(self.path, metrics["history"], metrics["best_epoch"], metric, metrics["input_path"],
                         checkpoints, n_val=n_val, n_train=n_train)  # fmt: skip

    def read_state(self) -> dict | None:
        """state.pt as saved, or None (absent, or unreadable: then the run starts over and says so)."""
        path = self.path / STATE
        if not path.exists():
            return None
        try:
            saved = read_torch_file(path, "state", RuntimeError)
        except RuntimeError as error:
            self.log(f"starting over: {error}")
            return None
        return saved if isinstance(saved, dict) and "epoch" in saved else None

    # -------------------------------------------------------------- claiming it
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One process trains in a run folder at a time (a lock that ends with the process, however it ends)."""
        with claimed(self.path / LOCK) as mine:
            if not mine:
                raise RunBusyError(
                    f"--out {self.path}: another process is training in this folder now; wait for it to finish or "
                    "choose another --out"
                )
            yield

    def claim(self, identity: dict, saved: dict | None) -> None:
        """A folder holding another run's results (a metrics.json or state.pt of other settings, data or split, or
        files of no run) is refused in one line naming the difference, unless `overwrite`: then they are replaced
        when this run writes its first epoch."""
        theirs, what = None, None
        try:
            metrics = json.loads((self.path / METRICS).read_text())
            theirs = metrics.get("identity") if isinstance(metrics, dict) else None
            what = "a finished run" if isinstance(metrics, dict) and metrics.get("finished") else "an unfinished run"
            if not isinstance(theirs, dict):
                theirs, what = {}, "a metrics.json written by no transferlab run of this version"
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            theirs, what = {}, "an unreadable metrics.json"
        if theirs == identity or theirs is None:
            if saved is None or saved.get("identity") == identity:
                foreign = [name for name in (CONFIG, SPLIT, BEST) if (self.path / name).exists()]
                if theirs is not None or not foreign:
                    return
                theirs, what = {}, f"files of no transferlab run ({', '.join(foreign)})"
            else:
                theirs, what = saved.get("identity") or {}, "a killed run's state.pt"
        difference = identity_difference(theirs, identity) if theirs else "not a transferlab run's"
        if not self.overwrite:
            raise RunFolderError(
                f"--out {self.path} holds {what} with other settings ({difference}): pass --overwrite to replace it, "
                "or choose another --out"
                if theirs
                else f"--out {self.path} holds {what}: pass --overwrite to replace them, or choose another --out"
            )
        self.log(f"replacing {what} in {self.path} ({difference})")
        self._replaces = [self.path / name for name in (BEST, METRICS, EPOCHS, STATE, CONFIG, SPLIT)]
        self._replaces += list(self.path.glob("best-epoch*.pt"))

    # -------------------------------------------------------------- writing
    def start(self, config: dict, split: Split, digests: np.ndarray) -> None:
        """Before the run writes its first result: the results it replaces are removed, so no file outlives its
        config, and its config.json, split.json and digests.npz are written."""
        for path in self._replaces:
            path.unlink(missing_ok=True)
        self._replaces = []
        atomic_write_json(config, self.path / CONFIG, "run config")
        atomic_write_json(split.to_dict(), self.path / SPLIT, "split")
        buffer = io.BytesIO()
        np.savez(buffer, train=digests[split.train], val=digests[split.val])
        atomic_write_bytes(buffer.getvalue(), self.path / DIGESTS, "image digests")

    def write_metrics(self, metrics: dict) -> None:
        """metrics.json, and its history as epochs.csv (a row per epoch, like timm's summary.csv), after each epoch."""
        atomic_write_json(metrics, self.path / METRICS)
        atomic_write_text(epochs_csv(metrics.get("history", [])), self.path / EPOCHS, "the per-epoch log")

    def save_state(self, saved: dict) -> None:
        atomic_save(saved, self.path / STATE, "resume state")

    def drop_state(self) -> None:
        """A finished run (or a trial its study recorded) needs no state.pt."""
        (self.path / STATE).unlink(missing_ok=True)


def epochs_csv(history: list[dict]) -> str:
    """A run's history as CSV: a column per number its rows record, in the order they first appear."""
    columns = list(dict.fromkeys(k for row in history for k, v in row.items() if isinstance(v, (int, float))))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def output_file(path: str | Path, flag: str, error: type[Exception]) -> Path:
    """The file an output option (predict --output, export -o) writes (fsutil.checked_output_file), never one of a run
    folder's own files: its results, its .lock and the temporary files its results are written through (a folder with
    a metrics.json, state.pt or .lock: one a run trains or trained in). Those are refused in one line, before any
    work."""
    target = checked_output_file(path, flag, error)
    own = _run_file(target.name)
    if own and any((target.parent / name).is_file() for name in (METRICS, STATE, LOCK)):
        raise error(f"{flag} {Path(path).expanduser()} is a file of the run folder {target.parent}: writing it would "
                    f"replace {own}; name another file")  # fmt: skip
    return target


def _run_file(name: str) -> str | None:
    """What a run folder keeps in a file of this name, in words, or None when it is none of its files."""
    if name == LOCK:
        return "the lock that keeps two processes from training there at once"
    if name.startswith(".") and ".tmp" in name:  # fsutil.replaced_on_success: .<file>.tmp<pid>, renamed over <file>
        name, _, pid = name[1:].rpartition(".tmp")
        if not pid.isdigit() or _run_file(name) is None:
            return None
        return f"a file being written to {name}"
    if name in RUN_FILES or name in TRACKING_FILES or (name.startswith("best-epoch") and name.endswith(".pt")):
        return "the run's results"
    return None


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint named by its file, or by the run folder `train` wrote (then that run's best.pt)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    if (path / BEST).is_file():
        return path / BEST
    if any((path / name).exists() for name in (LOCK, METRICS, STATE, CONFIG)):  # `train` ran here
        raise CheckpointError(f"{path} is a run folder without {BEST}: the run has no checkpoint yet (killed before "
                              "its first epoch ended?); train it (the same command), or name a checkpoint")  # fmt: skip
    raise CheckpointError(f"{path} is a directory without {BEST}: name a run folder `train` finished, or a checkpoint")


def unfinished_note(checkpoint: Path) -> str | None:
    """A note when `checkpoint` is the best checkpoint of a run that did not finish (killed, or stopped before its
    last epoch): the epoch it is from, of how many; None for a finished run or a checkpoint outside a run folder."""
    folder = RunDir(checkpoint.parent)
    if folder.best != checkpoint:
        return None
    metrics = folder.metrics()
    if metrics is None:  # best.pt written, metrics.json not yet: killed in the first epoch's records
        if not (folder.path / CONFIG).is_file():  # no run wrote here (a checkpoint copied beside nothing)
            return None
        epochs = json.loads((folder.path / CONFIG).read_text()).get("epochs")
        return (f"the run did not finish: {checkpoint.name} is from epoch 1 of {epochs}, and the run recorded no "
                "epoch's results (killed during its first epoch?)")  # fmt: skip
    if metrics.get("finished", True):
        return None
    epochs, stopped = metrics["config"].get("epochs"), len(metrics.get("history") or [])
    return (f"the run did not finish: {checkpoint.name} is from epoch {metrics['best_epoch']} of {epochs} (it stopped "
            f"after epoch {stopped}; the same train command resumes a killed run)")  # fmt: skip
