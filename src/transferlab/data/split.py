"""The one way a run's images are divided: a seeded, stratified test / validation / training split (or folds),
or the split a labels file gives, validated with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from ..errors import DataError
from .imageset import SPLIT_PARTS, ImageSet


# ------------------------------------------------------------------------------ splits
@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    official_test: bool = False

    def to_dict(self) -> dict:
        return {
            "train": self.train.tolist(),
            "val": self.val.tolist(),
            "test": self.test.tolist(),
            "official_test": self.official_test,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        return cls(
            *(np.asarray(d[k], dtype=np.int64) for k in ("train", "val", "test")),
            official_test=d.get("official_test", False),
        )


def _stratified_take(
    indices: np.ndarray, labels: np.ndarray, size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` in two, the second of `size` (count or fraction), class proportions kept."""
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
    try:
        keep, take = next(splitter.split(np.zeros(len(indices)), labels[indices]))
    except ValueError as error:
        raise DataError(f"cannot split {len(indices)} images stratified by class: {error}") from None
    return np.sort(indices[keep]), np.sort(indices[take])


def _check_class_sizes(labels, indices, test_fraction: float, classes: list[str] | None, limit: int | None) -> None:
    """A plain DataError when a class in `indices` is too small for the split make_split is about to make.

    Each stratified division needs 2 images of a class in the set it divides. The test division (as make_split
    sizes it) takes at most ceil(count * test_size / n) images of a class, and 2 must be left for validation.
    """
    present, counts = np.unique(labels[indices], return_counts=True)
    n, need = len(indices), 2
    if test_fraction > 0:
        test_size = max(int(round(test_fraction * n)), len(np.unique(labels)))
        need = 3
        while need <= n and need - -(-need * test_size // n) < 2:
            need += 1
    if counts.min() >= need:
        return
    label, count = int(present[counts.argmin()]), int(counts.min())
    name = repr(classes[label]) if classes is not None else f"#{label}"
    where = f" in the --limit {limit} subset" if limit is not None and n == limit else ""
    kind = "train/validation/test" if test_fraction > 0 else "train/validation"
    raise DataError(
        f"class {name} has {count} image{'s' * (count != 1)}{where}; a stratified {kind} split needs at least {need} "
        f"per class (add images or lower --test-fraction/--val-fraction)"
    )


def make_split(
    labels: np.ndarray,
    *,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    limit: int | None = None,
    official_test: bool = False,
    classes: list[str] | None = None,
    folds: int = 0,
    fold: int = 0,
) -> Split:
    """Hold out a test fraction, then a validation fraction, both stratified and seeded.

    With `official_test`, the test indices are left empty (the source's own test set is used) and
    validation is carved from the training images. Fractions are of the images in play. `classes` (the label
    names) lets the error for a class too small for the split name it. With `folds` (2 or more), the images left
    after the test split are cut into that many stratified folds (shuffled with `seed`) and fold `fold` is the
    validation split instead of `val_fraction`; the test split is the same images as without folds.
    """
    indices = np.arange(len(labels))
    if limit is not None and limit < len(indices):
        _check_class_sizes(labels, indices, 0.0, classes, None)
        _, indices = _stratified_take(indices, labels, limit, seed)
    n = len(indices)
    _check_class_sizes(labels, indices, 0.0 if official_test else test_fraction, classes, limit)
    test = np.zeros(0, dtype=np.int64)
    if not official_test and test_fraction > 0:
        indices, test = _stratified_take(
            indices, labels, max(int(round(test_fraction * n)), len(np.unique(labels))), seed
        )
    if folds:
        train, val = _fold_take(indices, labels, folds, fold, seed, classes)
    else:
        train, val = _stratified_take(
            indices, labels, max(int(round(val_fraction * n)), len(np.unique(labels))), seed + 1
        )
    return Split(train, val, test, official_test=official_test)


def _fold_take(
    indices: np.ndarray, labels: np.ndarray, folds: int, fold: int, seed: int, classes: list[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of `indices` when fold `fold` of `folds` stratified, seeded folds is the validation split.
    Every fold holds every class, so a class needs at least `folds` images here."""
    present, counts = np.unique(labels[indices], return_counts=True)
    if counts.min() < folds:
        label, count = int(present[counts.argmin()]), int(counts.min())
        name = repr(classes[label]) if classes is not None else f"#{label}"
        raise DataError(
            f"class {name} has {count} image{'s' * (count != 1)} left after the test split; {folds} stratified folds "
            f"need at least {folds} per class (add images, or lower folds or --test-fraction)"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    keep, take = list(splitter.split(np.zeros(len(indices)), labels[indices]))[fold]
    return np.sort(indices[keep]), np.sort(indices[take])


def split_for(images: ImageSet, config) -> Split:
    """The one way a run's data is divided: validated, seeded, stratified (see make_split); or, when the source
    names each row's part (a labels file's split column), exactly that split (test may be empty)."""
    source = config.source
    if len(images.classes) < 2:
        raise DataError(
            f"{source} has {len(images.classes)} class ({', '.join(images.classes)}): a classifier needs at least 2"
        )
    if config.official_test and images.test_images is None:
        raise DataError(f"official_test: {source} has no official test split; use test_fraction")
    if images.given_split is not None:
        # Subsampling would no longer be the user's split, so --limit is refused rather than applied per part.
        if config.limit is not None:
            raise DataError(
                f"limit {config.limit}: {source} gives its own split (its {config.labels_split_column} column); "
                "drop --limit, or ignore the column with --labels-split-column none"
            )
        if config.folds:
            raise DataError(
                f"folds {config.folds}: {source} gives its own validation split (its {config.labels_split_column} "
                "column); drop folds, or ignore the column with --labels-split-column none"
            )
        check_given_split(images.given_split, source, config.labels_split_column)
        train, val, test = (np.flatnonzero(images.given_split == code) for code in range(3))
        return Split(train, val, test)
    return make_split(
        images.labels,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        seed=config.split_seed,
        limit=config.limit,
        official_test=config.official_test,
        classes=images.classes,
        folds=config.folds,
        fold=config.fold,
    )


def split_arrays(images: ImageSet, split: Split, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one part of a split: train, val, or test (the source's own test set when the run used
    it). A run that held out no test images says so rather than score an empty set."""
    if name == "test" and split.official_test:
        if images.test_images is None:
            raise DataError("the run used an official test split, which this data source does not have")
        return images.test_images, images.test_labels
    indices = getattr(split, name)
    if len(indices) == 0:
        raise DataError(
            f"no {name} split: the run held out no {name} images (test_fraction = 0, or no test rows in a given split)"
            if name == "test"
            else f"no {name} split: it holds no images"
        )
    return images.images[indices], images.labels[indices]


def check_given_split(parts: np.ndarray, where: str, column: str | None) -> None:
    for code, name in enumerate(SPLIT_PARTS[:2]):
        if not (parts == code).any():
            raise DataError(f"{where}: no row of its {column or 'split'} column is {name!r} (train and val need rows)")


def class_counts(images: ImageSet, split: Split) -> dict[str, dict[str, int]]:
    """Images per class in each part of a split: {"train": {class: n}, "val": ..., "test": ...}."""
    test = images.labels[split.test]
    if split.official_test:
        test = images.test_labels if images.test_labels is not None else np.zeros(0, dtype=np.int64)
    parts = {"train": images.labels[split.train], "val": images.labels[split.val], "test": test}
    k = len(images.classes)
    return {name: dict(zip(images.classes, np.bincount(y, minlength=k).tolist())) for name, y in parts.items()}
