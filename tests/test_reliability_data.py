"""Reliability of the image source (transferlab.data). The spec these tests hold it to:

- 16-bit grey images (Pillow modes "I;16*", and "I" holding 16-bit values) are scaled to 8 bits (value / 257),
  not clipped to white; 32-bit "I" values above 65535 scale from 2**31 - 1. In decode_image (so predict too) and
  in folders.
- An image over Pillow's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS) is a one-line DataError naming
  the file and the limit; with skip_bad_images it is skipped and counted. Images between 1x and 2x the limit
  decode normally, without a warning (none escapes even where warnings are errors).
- Scanning follows symlinked folders but reads each real folder once, so a link loop ends. A dangling or looping
  file link is an unreadable image (DataError naming it, or skipped and counted). Files whose name starts with "."
  (macOS "._x.jpg") are ignored like hidden folders.
- The decode cache key covers every input that changes the arrays (files, image_size, skip_bad_images, cache
  format, Pillow's version): a run without skip_bad_images never reuses a cache that skipped files.
- The decode cache stores a sha256 of its arrays; a damaged cache (same-size corruption, truncation) gives one
  warning naming its folder and is rebuilt from the source files (folders and CIFAR-10).
- Saving never removes a valid cache: an existing valid copy is kept, a damaged one is set aside and deleted only
  after the new one is in place. An interrupted writer leaves no folder under the key; temporary folders of killed
  writers are removed by a later save once an hour old. An unwritable cache is a warning, not a crash.
- A class too small for the requested split is a plain DataError: the class, its count, the minimum per class.
- Through the CLI each failure is exit code 2 and exactly one stderr line "transferlab: error: ...", no traceback.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import pytest
from helpers import make_image_tree, tiny_config
from PIL import Image
from test_cli import assert_one_line_error, train_args
from test_data import write_fake_cifar

from transferlab.cli import main
from transferlab.data import cache as cache_module
from transferlab.data import decode as decode_module
from transferlab.data.decode import decode_image
from transferlab.data.sources import load_cifar10, load_image_folder, load_images
from transferlab.data.split import make_split
from transferlab.errors import DataError


def load(root, cache_dir, **kwargs):
    return load_image_folder(root, cache_dir, progress=False, **kwargs)


def bomb_warnings(record):
    return [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]


# ---------------------------------------------------------------------------- 16-bit images
RAMP16 = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)


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


def test_damaged_header_through_the_cli(make_tree, tmp_path, capsys):
    root = make_tree(per_class=4, size=16)
    tiff_claiming_a_huge_size(root / "green" / "scan.tif")
    (root / "red" / "folder.jpg").mkdir()  # a folder with an image name is a folder, not an image
    args = train_args(root, tmp_path / "run", tmp_path / "cache")
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), str(root / "green" / "scan.tif"), "exceeds limit")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert main([*args, "--skip-bad-images"]) == 0


# ---------------------------------------------------------------------------- decode cache
def test_cache_of_a_skipping_run_is_not_reused_without_skipping(make_tree, cache_dir):
    root = make_tree(per_class=4, size=16)
    (root / "green" / "broken.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert load(root, cache_dir, skip_bad=True).skipped == 1
    with pytest.raises(DataError, match="broken.png"):
        load(root, cache_dir)


def test_cache_key_covers_storage_size_and_skip_bad(make_tree, cache_dir):
    root = make_tree(per_class=3, size=16)
    keys = {load(root, cache_dir, storage_size=s, skip_bad=b).key for s in (None, 8) for b in (False, True)}
    assert len(keys) == 4 and all(key.startswith("folder-") for key in keys)


def test_skipping_run_then_strict_run_through_the_cli(make_tree, tmp_path, capsys):
    root = make_tree(per_class=5, size=16)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    args = train_args(root, tmp_path / "run", tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert main([*args, "--skip-bad-images"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), str(root / "red" / "broken.jpg"))


def overwrite_array_data(path, new_values):
    """Replace the data bytes of an .npy file in place, same length (the header stays valid)."""
    raw = path.read_bytes()
    data = np.asarray(new_values).tobytes()
    path.write_bytes(raw[: len(raw) - len(data)] + data)


def test_same_size_corruption_is_detected_and_rebuilt(make_tree, cache_dir):
    root = make_tree(per_class=4, size=16)
    first = load(root, cache_dir)
    folder = cache_dir / "decoded" / first.key
    overwrite_array_data(folder / "labels.npy", np.zeros(len(first), np.int64))  # every image "blue"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = load(root, cache_dir)
    damaged = [str(w.message) for w in record if str(folder) in str(w.message)]
    assert len(damaged) == 1 and "damaged" in damaged[0]
    np.testing.assert_array_equal(again.labels, first.labels)
    np.testing.assert_array_equal(again.images, first.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load(root, cache_dir).labels, first.labels)  # the rebuilt cache is clean


def test_truncated_cache_warns_and_is_rebuilt(make_tree, cache_dir):
    root = make_tree(per_class=3, size=16)
    first = load(root, cache_dir)
    expected = np.array(first.images)  # first.images maps the file truncated below: reading it then is SIGBUS
    images_file = cache_dir / "decoded" / first.key / "images.npy"
    images_file.write_bytes(images_file.read_bytes()[:200])
    with pytest.warns(UserWarning, match="damaged"):
        np.testing.assert_array_equal(load(root, cache_dir).images, expected)


def test_damaged_cifar_cache_is_rebuilt(tmp_path, cache_dir):
    write_fake_cifar(tmp_path / "data")
    first = load_cifar10(str(tmp_path / "data"), cache_dir, download=False)
    folder = cache_dir / "decoded" / first.key
    overwrite_array_data(folder / "images.npy", np.full(3072, 7, np.uint8))  # the last image, all 7
    with pytest.warns(UserWarning, match="damaged"):
        again = load_cifar10(str(tmp_path / "data"), cache_dir, download=False)
    np.testing.assert_array_equal(again.test_images, first.test_images)


def test_valid_cache_survives_a_writer_killed_at_the_swap(make_tree, cache_dir, monkeypatch):
    """Another process that missed the cache (it was being written) decodes too and is killed while saving."""
    root = make_tree(per_class=3, size=16)
    first = load(root, cache_dir)
    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "cache_load", lambda folder: None)

        def killed(*args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(cache_module.os, "replace", killed)
        try:
            load(root, cache_dir)
        except KeyboardInterrupt:
            pass
    monkeypatch.setattr(decode_module, "_decode_open", lambda *a, **k: pytest.fail("the valid cache was lost"))
    np.testing.assert_array_equal(load(root, cache_dir).images, first.images)


def test_writer_interrupted_mid_write_leaves_nothing(make_tree, cache_dir, monkeypatch):
    root = make_tree(per_class=3, size=16)
    real_save = np.save

    def save(path, array):
        if str(path).endswith("labels.npy"):
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(cache_module.np, "save", save)
    with pytest.raises(KeyboardInterrupt):
        load(root, cache_dir)
    assert list((cache_dir / "decoded").iterdir()) == []  # no half cache under the key, no temporary folder


def test_stale_temporary_folders_are_removed(make_tree, cache_dir):
    decoded = cache_dir / "decoded"
    stale, fresh, aside = decoded / "folder-abc.tmp123", decoded / "folder-def.tmp-9-ab", decoded / "folder-x.old-1-cd"
    for path in (stale, fresh, aside):
        path.mkdir(parents=True)
        (path / "images.npy").write_bytes(b"half")
    hours_ago = time.time() - 2 * 3600
    for path in (stale, aside):
        os.utime(path, (hours_ago, hours_ago))
    load(make_tree(per_class=3, size=16), cache_dir)
    assert not stale.exists() and not aside.exists() and fresh.exists()  # fresh: maybe a live writer's


def test_unwritable_cache_is_a_warning(make_tree, tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="cannot write the decode cache"):
        images = load(make_tree(per_class=3, size=16), tmp_path / "cache")
    assert len(images) == 9


def test_cache_meta_holds_the_checksum(make_tree, cache_dir):
    first = load(make_tree(per_class=3, size=16), cache_dir)
    meta = json.loads((cache_dir / "decoded" / first.key / "meta.json").read_text())
    assert len(meta["sha256"]) == 64


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


def test_one_file_in_two_class_folders_is_refused(make_tree, tmp_path):
    """A class folder linked to another (or one file linked into two classes) would give its images two labels."""
    root = make_tree("linked", per_class=3, size=16)
    os.symlink(root / "red", root / "redcopy")
    with pytest.raises(DataError, match="one file in two classes"):
        load_image_folder(root, tmp_path / "cache", progress=False)
