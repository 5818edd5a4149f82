"""Evaluating a checkpoint on labelled images: which images (the run's own test split, or all of other data), stored
as the run stored its own, scored by the one scoring path (scoring.metrics.scores) on the one forward path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config.run import RunConfig
from ..data.imageset import ImageSet
from ..data.sources import load_images
from ..data.split import split_arrays, split_for
from ..engine.rundir import RunDir, checkpoint_file, unfinished_note
from ..errors import DataError
from ..scoring.metrics import scores
from .predict import LoadedModel, load_checkpoint


# ------------------------------------------------------------------------------ the images, as the run saw them
def stored_as_trained(loaded: LoadedModel, config: RunConfig) -> ImageSet:
    """The images `config` names, each stored exactly as the checkpoint's run stored its own: the run's resize policy
    and its stored side (every file at that side, enlarged or reduced). Decoded first as the run decoded (its storage
    size, cached): the run's own data, or any set that comes out at the same side, is read from its cache; a set that
    comes out at another side is decoded again at the run's. (Checkpoints before format 4 did not record the side:
    files are stored at most at the run's storage size, as before.)"""
    data = load_images(config, loaded.info["storage_size"])
    side = loaded.info.get("stored_side")
    if side is not None and data.stored_side != side:
        data = load_images(config, loaded.info["storage_size"], side=side)
    return data


def split_applies(run_dir: str | Path, data: ImageSet) -> bool | None:
    """Whether the run's split.json names these very images: its training and validation rows hold, pixel for pixel,
    the images the run recorded (digests.npz), wherever the files lie. None where the run recorded no digests."""
    folder = RunDir(run_dir)
    saved, split = folder.digests(), folder.split()
    if saved is None or split is None:
        return None
    rows = [split.train, split.val]
    if any(len(r) and r.max() >= len(data) for r in rows):
        return False
    digests = data.digests()
    return bool(np.array_equal(digests[rows[0]], saved["train"]) and np.array_equal(digests[rows[1]], saved["val"]))


def seen_in_training(run_dir: str | Path, digests: np.ndarray) -> dict[str, int] | None:
    """How many of these images (ImageSet.digests) the run trained and validated on: pixel for pixel the same stored
    image, whatever file or folder it came from. None where the run folder has no digests (written before them)."""
    saved = RunDir(run_dir).digests()
    if saved is None:
        return None
    return {part: int(np.isin(digests, saved[part]).sum()) for part in ("train", "val")}


def align_labels(loaded: LoadedModel, data: ImageSet) -> np.ndarray:
    """Map the data set's class indices onto the checkpoint's by name."""
    unknown = [c for c in data.classes if c not in loaded.classes]
    if unknown:
        raise DataError(f"class {unknown[0]!r} is not one of the checkpoint's classes ({', '.join(loaded.classes)})")
    mapping = np.asarray([loaded.classes.index(c) for c in data.classes], dtype=np.int64)
    return mapping[data.labels]


# ------------------------------------------------------------------------------ scoring
def evaluate_arrays(loaded: LoadedModel, images: np.ndarray, labels: np.ndarray, batch_size: int | None = None) -> dict:
    """`scores` of the model's probabilities as validation computed them (accuracy, the checkpoint's loss, per-class
    figures, confusion matrix, NLL, ECE), plus the checkpoint's temperature and the NLL, ECE and reliability bins of
    the calibrated probabilities (accuracy is the same: T does not change the argmax)."""
    return evaluate_logits(loaded, loaded.view_logits(images, batch_size), torch.as_tensor(labels))


def evaluate_logits(loaded: LoadedModel, logits: torch.Tensor, y: torch.Tensor) -> dict:
    """`evaluate_arrays` of (V, N, K) logits already computed by `loaded.view_logits`."""
    options = {"loss": loaded.loss, "label_smoothing": loaded.label_smoothing}
    result = scores(logits, y, loaded.classes, **options)
    calibrated = scores(logits, y, loaded.classes, **options, temperature=loaded.temperature)
    return {
        **result,
        "temperature": loaded.temperature,
        "calibration": loaded.calibration,
        "nll_calibrated": calibrated["nll"],
        "ece_calibrated": calibrated["ece"],
        "reliability_calibrated": calibrated["reliability"],
    }


def evaluate_checkpoint(checkpoint: str | Path, data: ImageSet, *, indices: np.ndarray | None = None,
                        device: str = "auto", batch_size: int | None = None) -> dict:  # fmt: skip
    loaded = load_checkpoint(checkpoint, device)
    labels = align_labels(loaded, data)
    images = data.images
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return evaluate_arrays(loaded, images, labels, batch_size)


# ------------------------------------------------------------------------------ `transferlab evaluate`
@dataclass
class Evaluation:
    """A checkpoint's figures on one split of some data, and what a reader must know about them."""

    scores: dict  # evaluate_arrays
    split: str  # "train", "val", "test" or "all"
    notes: list[str] = field(default_factory=list)  # e.g. the run trained on some of these images
    seen_in_training: dict[str, int] | None = None  # of other data: images the run trained / validated on

    def to_dict(self) -> dict:
        out = {**self.scores, "split": self.split}
        if self.seen_in_training is not None:
            out["seen_in_training"] = self.seen_in_training
        return out


def _same_folder(a: str, b: str) -> bool:
    """Do two data sources (--data folders or --labels files) name the same files on disk (not cifar10)?"""
    if "cifar10" in (a, b):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def own_data(loaded: LoadedModel, data: ImageSet, source: str, run_source: str, run_dir: Path) -> tuple[bool, bool]:
    """(the very rows the run was split from, so its split.json applies; images the run trained on, possibly a
    changed or moved copy of them). The rows are the run's when its training and validation rows hold the images the
    run recorded (split_applies), wherever they lie (a moved copy too); runs before those records compare the decoded
    data's key."""
    applies = split_applies(run_dir, data)
    if applies is not None:
        own = applies
    elif loaded.info.get("data"):
        own = data.key == loaded.info["data"]
    else:
        own = source == run_source
    return own, own or _same_folder(source, run_source)


@dataclass
class EvaluationImages:
    """The images a checkpoint is scored on, as `evaluate` and `analyze` choose them, and what a reader must know."""

    loaded: LoadedModel
    checkpoint: Path  # the checkpoint file (a run folder's best.pt where a folder was named)
    source: str  # the data as named: an image folder, a labels file or cifar10
    images: np.ndarray  # (N, H, W, 3) uint8, stored as the run stored its own
    labels: np.ndarray  # the checkpoint's class indices
    split: str  # "train", "val", "test" or "all"
    notes: list[str] = field(default_factory=list)
    seen_in_training: dict[str, int] | None = None  # of other data: images the run trained / validated on


def recorded_source(config: RunConfig, directory: str | None) -> str:
    """The data a run recorded (cifar10, or a folder's or a labels file's path), a relative path taken from the
    directory training ran in (`directory`, recorded with the checkpoint; None before it was: as given)."""
    if config.source == "cifar10" or directory is None or Path(config.source).expanduser().is_absolute():
        return config.source
    return str(Path(directory) / config.source)


def check_recorded(source: str) -> None:
    """A one-line DataError where the data a run recorded is not there any more."""
    if source == "cifar10" or Path(source).expanduser().exists():
        return
    if not Path(source).expanduser().is_absolute():  # a run recorded before its directory was
        raise DataError(
            f"the data the run recorded, {source}, is a path relative to the directory training ran in, and "
            f"{Path.cwd()} holds no {source}: run this from that directory, or name the data with --data (or --labels)"
        )
    raise DataError(f"the data the run recorded, {source}, is not there any more (moved or deleted?): name it with "
                    "--data (or --labels) where it lies now")  # fmt: skip


def evaluation_images(checkpoint: str | Path, given: dict, split: str | None = None,
                      device: str = "auto") -> EvaluationImages:  # fmt: skip
    """The images `evaluate` and `analyze` score: the data `given` names (RunConfig values: data, labels, data_dir,
    ...; the rest is the run's own). On the run's own data the default split is its test split (all would count its
    training images); other data is scored whole, and a split of it only where the data gives one. `given` naming
    neither data nor labels: the data the run recorded (a one-line DataError where it is no longer there)."""
    checkpoint = checkpoint_file(checkpoint)
    loaded = load_checkpoint(checkpoint, device)
    run_config = RunConfig.from_dict(loaded.info["config"])
    run_source = recorded_source(run_config, loaded.info.get("directory"))
    recorded = given.get("data") is None and given.get("labels") is None
    if recorded:
        check_recorded(run_source)
        given = {k: v for k, v in given.items() if k not in ("data", "labels")}
        given["labels" if run_config.labels is not None else "data"] = run_source
    elif given.get("data") is None:  # a labels file: data stays at its default, which means "none"
        given = {**given, "data": RunConfig().data}
    # decoded as the run stored its images
    config = RunConfig.from_dict({**given, "resize_policy": loaded.info["resize_policy"]}, base=run_config)
    data = stored_as_trained(loaded, config)
    run_dir = Path(checkpoint).parent
    own, same_images = own_data(loaded, data, config.source, run_source, run_dir)
    if not own and same_images and split != "all":
        raise DataError(
            f"{config.source} is the folder the run trained on, but its images (or --skip-bad-images) differ from "
            "the run's: its split no longer says which images it trained on; use --split all to score every image"
        )
    if not own and split in ("train", "val", "test") and data.given_split is None:
        raise DataError(
            f"--split {split}: {config.source} is not the data the run was split from, so the run's split does not "
            "apply to it; score all of it (leave --split out), or give the run's own data"
        )
    name = split or ("test" if own else "all")
    notes, seen = [f"no --data: scoring the data the run recorded, {run_source}"] if recorded else [], None
    unfinished = unfinished_note(checkpoint)
    if unfinished:
        notes.append(unfinished)
    if name == "all":
        images, labels = data.images, data.labels
        if same_images:
            where = "" if _same_folder(config.source, run_source) else " (a copy of them, here)"
            notes.append(f"--split all on the run's own data{where} includes the images it was trained on")
        else:  # other data may still hold the run's images: a changed copy, the same files named another way
            seen = seen_in_training(run_dir, data.digests())
            if seen and seen["train"] + seen["val"]:
                notes.append(f"{seen['train']} of these {len(labels)} images are images the run trained on, "
                             f"{seen['val']} it validated on: their figures are not a test")  # fmt: skip
    else:
        saved = RunDir(run_dir).split() if own else None
        images, labels = split_arrays(data, saved or split_for(data, config), name)
    labels = align_labels(loaded, ImageSet(images, labels, data.classes, data.key))
    return EvaluationImages(loaded, checkpoint, config.source, images, labels, name, notes, seen)


def evaluate_on(checkpoint: str | Path, given: dict, split: str | None = None, device: str = "auto") -> Evaluation:
    """The checkpoint scored on the images `evaluation_images` chooses."""
    chosen = evaluation_images(checkpoint, given, split, device)
    result = evaluate_arrays(chosen.loaded, chosen.images, chosen.labels)
    return Evaluation(result, chosen.split, chosen.notes, chosen.seen_in_training)
