"""Reading images: every file decodes to the right pixels once, or is a one-line DataError naming it.

- 16-bit grey images are scaled to 8 bits (value / 257), not clipped to white; 32-bit integer and float ("F", 0..1)
  images scale likewise.
- An image over Pillow's decompression-bomb limit (2 x MAX_IMAGE_PIXELS) is a one-line error naming the file and the
  limit, or skipped and counted with skip_bad_images; images below it decode quietly.
- Scanning follows symlinked folders but reads each real folder once; dangling or looping file links are unreadable
  images; hidden files ("._x.jpg") are ignored.
- One file, two paths: an image reached twice (a symlink or hard link in its class folder, a labels file naming it by
  another path) is one image, counted once and never in two parts of a split, with a warning saying how many paths
  were dropped; one file under two labels is an error naming both.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from helpers import (
    assert_one_line_error,
    make_image_tree,
    quiet,
    tiny_config,
    train_args,
)
from PIL import Image

from transferlab.cli import main
from transferlab.data.decode import decode_image
from transferlab.data.sources import load_image_folder, load_images, read_labels_file, scan_image_folder
from transferlab.engine.train import run_training
from transferlab.errors import DataError


def load(root, cache_dir, **kwargs):
    return load_image_folder(root, cache_dir, progress=False, **kwargs)


def bomb_warnings(record):
    return [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]


RAMP16 = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)


def tiff_claiming_a_huge_size(path):
    """A valid 16 px TIFF whose header then claims 65535 x 65535 pixels (what a damaged header can say)."""
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path, compression=None)
    raw = bytearray(path.read_bytes())
    assert raw[:2] == b"II"
    ifd = int.from_bytes(raw[4:8], "little")
    for i in range(int.from_bytes(raw[ifd : ifd + 2], "little")):
        entry = ifd + 2 + 12 * i
        if int.from_bytes(raw[entry : entry + 2], "little") in (256, 257):  # ImageWidth, ImageLength
            kind = int.from_bytes(raw[entry + 2 : entry + 4], "little")  # 3: SHORT, 4: LONG
            raw[entry + 8 : entry + 12] = (65535).to_bytes(2 if kind == 3 else 4, "little").ljust(4, b"\0")
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------- 16-bit images
@pytest.mark.parametrize("suffix", ["png", "tif", "pgm"])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, suffix):
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(RAMP16).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I"), image.mode  # the modes Pillow opens 16-bit grey files in
    array = decode_image(path)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert (array[..., 0] == array[..., 2]).all()
    assert np.abs(array[..., 0].astype(int) - np.round(RAMP16 / 257)).max() <= 1
    assert (array == 255).mean() < 0.05  # clipping made 99.6% of this ramp white


def test_32bit_integer_grey_is_scaled(tmp_path):
    values = np.linspace(0, 2**31 - 1, 16 * 16).astype(np.int32).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "deep.tif")
    array = decode_image(tmp_path / "deep.tif")
    assert np.abs(array[..., 1].astype(int) - np.round(values / (2**31 - 1) * 255)).max() <= 1
    assert decode_image(tmp_path / "deep.tif", 8).shape == (8, 8, 3)


def test_16bit_folder_through_load_images(tmp_path, cache_dir):
    levels = {"dark": 10_000, "mid": 30_000}  # 8-bit: 39 and 117
    rng = np.random.default_rng(0)
    for name, level in levels.items():
        (tmp_path / "t" / name).mkdir(parents=True)
        for i in range(5):
            noise = rng.integers(-500, 500, (16, 16))
            Image.fromarray((level + noise).astype(np.uint16)).save(tmp_path / "t" / name / f"{i}.png")
    images = load_images(tiny_config(tmp_path / "t", cache_dir))
    for label, name in enumerate(images.classes):
        mean = images.images[images.labels == label].mean()
        assert abs(mean - levels[name] / 257) < 2, (name, mean)


# ---------------------------------------------------------------------------- decompression bombs
def test_bomb_is_a_one_line_error_naming_file_and_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the error limit is twice this: 200 pixels
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    with pytest.raises(DataError) as error:
        decode_image(path)
    text = str(error.value)
    assert str(path) in text and "200" in text and "\n" not in text


def test_bomb_in_a_folder_is_skipped_and_counted(make_tree, cache_dir, monkeypatch):
    root = make_tree(per_class=4, size=12)  # 144 pixels: over the warning size, under the error size
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "red" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="bomb.png"):
        load(root, cache_dir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        images = load(root, cache_dir, skip_bad=True)
    assert images.skipped == 1 and len(images) == 12
    assert [str(w.message) for w in record if "skipped 1 unreadable" in str(w.message)]
    assert not bomb_warnings(record)


def test_warning_sized_images_decode_quietly_even_where_warnings_are_errors(make_tree, cache_dir, monkeypatch):
    root = make_tree(per_class=3, size=12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = load(root, cache_dir)
    assert images.images.shape == (9, 12, 12, 3)
    # a single file (predict): decoded, or at worst a one-line DataError, never a raw warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            decode_image(root / "red" / "000.png")
        except DataError as error:
            assert "000.png" in str(error)


def test_bomb_through_the_cli(make_tree, tmp_path, monkeypatch, capsys):
    root = make_tree(per_class=4, size=12)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "blue" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert main(train_args(root, tmp_path / "run", tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), str(root / "blue" / "bomb.png"), "200")


# ---------------------------------------------------------------------------- scanning
def test_symlink_loop_ends_and_linked_folders_count_once(make_tree, tmp_path, cache_dir):
    root = make_tree(per_class=3, size=16)
    os.symlink(root / "red", root / "red" / "loop")  # red/loop/loop/... forever if followed blindly
    extra = make_image_tree(tmp_path / "extra", classes=("red",), per_class=2, size=16, seed=5)
    os.symlink(extra / "red", root / "red" / "more")  # a linked folder elsewhere is still read
    os.symlink(extra / "red", root / "red" / "same")  # ... once, however many links lead to it
    images = load(root, cache_dir)
    assert np.bincount(images.labels).tolist() == [3, 3, 5]  # blue, green, red


def test_dangling_and_looping_file_links_are_unreadable_images(make_tree, tmp_path, cache_dir):
    root = make_tree(per_class=4, size=16)
    os.symlink(tmp_path / "gone.png", root / "green" / "gone.png")
    with pytest.raises(DataError) as error:
        load(root, cache_dir)
    assert str(root / "green" / "gone.png") in str(error.value) and "\n" not in str(error.value)
    os.symlink("self.png", root / "red" / "self.png")  # ELOOP
    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        images = load(root, cache_dir, skip_bad=True)
    assert images.skipped == 2 and len(images) == 12


def test_dangling_link_through_the_cli(make_tree, tmp_path, capsys):
    root = make_tree(per_class=4, size=16)
    os.symlink(tmp_path / "gone.jpg", root / "red" / "gone.jpg")
    assert main(train_args(root, tmp_path / "run", tmp_path / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), str(root / "red" / "gone.jpg"))


def test_hidden_files_are_ignored(make_tree, cache_dir):
    root = make_tree(per_class=3, size=16)
    (root / "red" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork, not an image")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "green" / ".thumbnail.png")
    images = load(root, cache_dir)
    assert np.bincount(images.labels).tolist() == [3, 3, 3]


def test_damaged_header_through_the_cli(make_tree, tmp_path, capsys):
    root = make_tree(per_class=4, size=16)
    tiff_claiming_a_huge_size(root / "green" / "scan.tif")
    (root / "red" / "folder.jpg").mkdir()  # a folder with an image name is a folder, not an image
    args = train_args(root, tmp_path / "run", tmp_path / "cache")
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), str(root / "green" / "scan.tif"), "exceeds limit")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert main([*args, "--skip-bad-images"]) == 0


# ---------------------------------------------------------------------------- classes too small to split
def test_one_file_in_two_class_folders_is_refused(make_tree, tmp_path):
    """A class folder linked to another (or one file linked into two classes) would give its images two labels."""
    root = make_tree("linked", per_class=3, size=16)
    os.symlink(root / "red", root / "redcopy")
    with pytest.raises(DataError, match="one file in two classes"):
        load_image_folder(root, tmp_path / "cache", progress=False)


def test_float_images_are_scaled(tmp_path):
    path = tmp_path / "half.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    assert int(decode_image(path).max()) == 128
    path = tmp_path / "levels.tif"
    Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32)).save(path)
    assert int(decode_image(path).max()) == 200


# ---------------------------------------------------------------------------- one file, two paths
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_an_image_linked_inside_its_class_is_counted_once(link, make_tree, tmp_path):
    tree = make_tree("images", per_class=12, size=16)
    original = tree / "red" / "000.png"
    for i in range(3):  # three more paths to one image
        twin = tree / "red" / f"twin{i}.png"
        os.symlink(original, twin) if link == "symlink" else os.link(original, twin)
    with pytest.warns(UserWarning, match="3 paths reached an image already listed"):
        source = scan_image_folder(tree)
    assert source.duplicates == 3 and len(source.files) == 36
    assert len({os.path.realpath(path) for path, _ in source.files}) == 36
    config = tiny_config(tree, tmp_path / "cache")
    with pytest.warns(UserWarning, match="counted once"):
        result = run_training(config, tmp_path / "run", log=quiet)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert metrics["duplicates"] == 3 and metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 36


def test_a_labels_file_naming_one_image_twice_counts_it_once(make_tree, tmp_path):
    tree = make_tree("images", per_class=8, size=16)
    os.symlink(tree / "red" / "001.png", tree / "red" / "alias.png")
    rows = [f"images/{c}/{i:03d}.png,{c}" for c in ("red", "green", "blue") for i in range(8)]
    rows += ["./images/red/../red/001.png,red", "images/red/alias.png,red"]  # the same image by two more paths
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="2 paths reached an image already listed"):
        parsed = read_labels_file(table)
    assert parsed.duplicates == 2 and len(parsed.paths) == 24
    table.write_text("path,label\n" + "\n".join([*rows[:24], "images/red/alias.png,green"]) + "\n")
    with pytest.raises(DataError, match=r"row 26: images/red/alias.png is the image of row 3 with another label"):
        read_labels_file(table)
