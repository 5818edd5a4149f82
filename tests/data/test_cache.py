"""The decode cache: its key covers every input that changes the arrays, and it never serves damaged data.

- The key covers the files, the storage size, skip_bad_images, the cache format and Pillow's version: a run without
  skip_bad_images never reuses a cache that skipped files.
- The cache stores a sha256 of its arrays; a damaged cache (same-size corruption, truncation) gives one warning naming
  its folder and is rebuilt from the source files (folders and CIFAR-10).
- Saving never removes a valid cache; an interrupted writer leaves no folder under the key; stale temporary folders
  are removed; an unwritable cache or a full disk is a warning (and no memory map of a short file), not a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_one_line_error,
    small_filesystem,
    train_args,
    write_fake_cifar,
)

from transferlab.cli import main
from transferlab.data import cache as cache_module
from transferlab.data import decode as decode_module
from transferlab.data.sources import load_cifar10, load_image_folder
from transferlab.errors import DataError


def load(root, cache_dir, **kwargs):
    return load_image_folder(root, cache_dir, progress=False, **kwargs)


def overwrite_array_data(path, new_values):
    """Replace the data bytes of an .npy file in place, same length (the header stays valid)."""
    raw = path.read_bytes()
    data = np.asarray(new_values).tobytes()
    path.write_bytes(raw[: len(raw) - len(data)] + data)


def no_space(monkeypatch, module: str = "transferlab.fsutil") -> None:
    monkeypatch.setattr(f"{module}.free_bytes", lambda path: 1024)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


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


# ---------------------------------------------------------------------------- full disks
def test_a_full_disk_for_the_decode_cache_is_a_warning_and_no_memory_map(make_tree, tmp_path, monkeypatch):
    tree = make_tree("images", per_class=12, size=16)
    no_space(monkeypatch, "transferlab.data.decode")
    with pytest.warns(UserWarning, match="no space for the decode cache .* needs .* MB free"):
        images = load_image_folder(tree, tmp_path / "cache", progress=False)
    assert not isinstance(images.images, np.memmap) and len(images) == 36
    assert not list((tmp_path / "cache" / "decoded").glob("*"))  # neither a cache nor a temporary folder


@pytest.mark.slow
def test_a_really_full_disk_never_kills_decoding_with_sigbus(make_tree, tmp_path):
    """The decode cache on a filesystem too small for it: a memory map of it would die of SIGBUS writing a page.
    In its own process, so a crash is a failed test, not a dead suite."""
    tree = make_tree("images", per_class=20, size=64)  # 60 x 64 x 64 x 3: 737 KB decoded
    with small_filesystem(tmp_path / "small", "256k") as small:
        args = train_args(tree, tmp_path / "run", small / "cache", "--resolution", "64")
        done = subprocess.run([sys.executable, "-m", "transferlab", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "no space for the decode cache" in done.stderr and "Traceback" not in done.stderr
        assert leftovers(small) == []
