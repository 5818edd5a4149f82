"""make_split: stratified, disjoint, seeded train/val/test index sets."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_one_line_error, train_args

from transferlab.cli import main
from transferlab.data.split import Split, make_split
from transferlab.errors import DataError

LABELS = np.asarray(([0] * 6 + [1] * 3 + [2]) * 10, dtype=np.int64)


def proportions(labels, idx):
    return np.bincount(labels[idx], minlength=3) / len(idx)


def test_sizes_and_disjoint_cover():
    split = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (70, 10, 20)
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert len(np.unique(all_idx)) == len(all_idx) == len(LABELS)
    for part in (split.train, split.val, split.test):
        assert part.dtype == np.int64 and (np.diff(part) > 0).all()  # sorted, unique


def test_stratified_within_one_image():
    split = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=3)
    expected = np.bincount(LABELS) / len(LABELS)
    for part in (split.train, split.val, split.test):
        counts = np.bincount(LABELS[part], minlength=3)
        assert np.all(np.abs(counts - expected * len(part)) <= 1), (counts, expected * len(part))


def test_seeded_and_reproducible():
    a = make_split(LABELS, test_fraction=0.2, val_fraction=0.2, seed=7)
    b = make_split(LABELS, test_fraction=0.2, val_fraction=0.2, seed=7)
    c = make_split(LABELS, test_fraction=0.2, val_fraction=0.2, seed=8)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.test, c.test)


def test_limit_is_a_stratified_subset():
    split = make_split(LABELS, test_fraction=0.2, val_fraction=0.2, seed=0, limit=50)
    used = np.concatenate([split.train, split.val, split.test])
    assert len(used) == 50 and len(np.unique(used)) == 50
    assert np.all(np.abs(np.bincount(LABELS[used], minlength=3) - np.asarray([30, 15, 5])) <= 1)
    assert (len(split.test), len(split.val)) == (10, 10)  # fractions of the images in play


def test_limit_larger_than_the_data_is_ignored():
    split = make_split(LABELS, test_fraction=0.1, val_fraction=0.1, seed=0, limit=10_000)
    assert len(split.train) + len(split.val) + len(split.test) == len(LABELS)


def test_official_test_leaves_test_empty():
    split = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=0, official_test=True)
    assert len(split.test) == 0 and split.official_test
    assert (len(split.train), len(split.val)) == (90, 10)


def test_zero_test_fraction():
    split = make_split(LABELS, test_fraction=0.0, val_fraction=0.1, seed=0)
    assert len(split.test) == 0 and len(split.train) == 90


def test_tiny_fractions_still_hold_as_many_images_as_classes():
    split = make_split(LABELS, test_fraction=0.01, val_fraction=0.01, seed=0)
    assert (len(split.test), len(split.val)) == (3, 3)


def test_too_few_images_for_a_stratified_split():
    with pytest.raises(DataError, match="stratified"):
        make_split(np.asarray([0, 0, 0, 1]), test_fraction=0.2, val_fraction=0.2, seed=0)


def test_split_round_trips_through_a_dict():
    split = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=0)
    again = Split.from_dict(split.to_dict())
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(again, name), getattr(split, name))


# ---------------------------------------------------------------------------- classes too small to split
def test_class_too_small_for_the_split_is_named():
    labels = np.asarray([0] * 6 + [1] * 2 + [2] * 6)
    with pytest.raises(DataError) as error:
        make_split(labels, test_fraction=0.2, val_fraction=0.2, seed=0, classes=["ant", "cat", "dog"])
    text = str(error.value)
    assert "class 'cat' has 2 images" in text and "needs at least 3 per class" in text and "\n" not in text


def test_minimum_depends_on_the_split():
    labels = np.asarray([0] * 6 + [1] * 1 + [2] * 6)
    with pytest.raises(DataError, match=r"class #1 has 1 image; a stratified train/validation split needs at least 2"):
        make_split(labels, test_fraction=0.2, val_fraction=0.2, seed=0, official_test=True)
    labels = np.asarray([0] * 10 + [1] * 3 + [2] * 10)  # a test half takes up to 2 of 3: none left to validate
    with pytest.raises(DataError, match=r"class 'b' has 3 images; .* needs at least 5 per class"):
        make_split(labels, test_fraction=0.5, val_fraction=0.2, seed=0, classes=["a", "b", "c"])


def test_class_too_small_through_the_cli(make_tree, tmp_path, capsys):
    root = make_tree(per_class=4, size=16)
    for path in sorted((root / "green").iterdir())[2:]:
        path.unlink()
    assert main(train_args(root, tmp_path / "run", tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "has 2 images", "needs at least 3 per class", "--test-fraction")
