"""Reliability of the image source (transferlab.data). The spec these tests hold it to:

- A class too small for the requested split is a plain DataError: the class, its count, the minimum per class.
- Through the CLI each failure is exit code 2 and exactly one stderr line "transferlab: error: ...", no traceback.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_cli import assert_one_line_error, train_args

from transferlab.cli import main
from transferlab.data import DataError, load_image_folder, make_split


def load(root, cache_dir, **kwargs):
    return load_image_folder(root, cache_dir, progress=False, **kwargs)


def bomb_warnings(record):
    return [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]


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
