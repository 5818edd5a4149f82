"""Image sources: ImageFolder decoding and its disk cache, CIFAR-10 offline, and one-line DataErrors."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import numpy as np
import pytest
from helpers import (
    CLASS_COLOURS,
    assert_one_line_error,
    noise_image,
    tiny_config,
    write_fake_cifar,
)
from PIL import Image

from transferlab.cli import main
from transferlab.data import decode as decode_module
from transferlab.data.decode import decode_image
from transferlab.data.sources import load_cifar10, load_image_folder, load_images
from transferlab.errors import DataError


def load(root, cache_dir, **kwargs):
    return load_image_folder(root, cache_dir, progress=False, **kwargs)


# ---------------------------------------------------------------------------- decoding
def test_image_folder_arrays(image_tree, cache_dir):
    images = load(image_tree, cache_dir)
    assert images.classes == ["blue", "green", "red"]  # sorted folder names
    assert images.images.shape == (45, 24, 24, 3) and images.images.dtype == np.uint8
    assert images.labels.dtype == np.int64 and np.bincount(images.labels).tolist() == [15, 15, 15]
    assert len(images) == 45 and images.skipped == 0 and images.test_images is None
    # labels follow the folders: the red class is red on average
    red = images.images[images.labels == images.classes.index("red")].reshape(-1, 3).mean(0)
    assert red[0] > 150 and red[1] < 100 and red[2] < 100


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_decode_converts_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(noise_image((90, 160, 30), 16, np.random.default_rng(0)))
    path = tmp_path / f"x-{mode}.png"
    rgb.convert(mode).save(path)
    array = decode_image(path)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    if mode == "L":
        assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_mixed_modes_in_one_folder(tmp_path, cache_dir):
    rng = np.random.default_rng(1)
    for cls, mode, ext in (("a", "L", "png"), ("a", "RGBA", "png"), ("b", "P", "gif"), ("b", "RGB", "jpg")):
        (tmp_path / "t" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image((100, 100, 100), 20, rng)).convert(mode).save(
            tmp_path / "t" / cls / f"{mode}.{ext}"
        )
    images = load(tmp_path / "t", cache_dir)
    assert images.images.shape == (4, 20, 20, 3)


def test_mixed_sizes_are_made_uniform(tmp_path, cache_dir):
    rng = np.random.default_rng(2)
    sizes = {"a": [(16, 16), (16, 16), (40, 30)], "b": [(16, 16), (20, 24), (16, 16)]}
    for cls, shapes in sizes.items():
        (tmp_path / "t" / cls).mkdir(parents=True)
        for i, shape in enumerate(shapes):
            Image.fromarray(noise_image((50, 50, 50), shape, rng)).save(tmp_path / "t" / cls / f"{i}.png")
    images = load(tmp_path / "t", cache_dir)
    assert images.images.shape == (6, 16, 16, 3)  # the most common shorter side, square


def test_nested_files_and_extensions(tmp_path, cache_dir):
    rng = np.random.default_rng(3)
    for rel in ("a/x.PNG", "a/sub/y.jpeg", "b/z.bmp"):
        (tmp_path / "t" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image((1, 2, 3), 8, rng)).save(tmp_path / "t" / rel)
    (tmp_path / "t" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "t" / ".hidden").mkdir()
    images = load(tmp_path / "t", cache_dir)
    assert images.classes == ["a", "b"] and np.bincount(images.labels).tolist() == [2, 1]


# ---------------------------------------------------------------------------- cache
def test_second_load_hits_the_cache(make_tree, cache_dir, monkeypatch):
    root = make_tree(per_class=5, size=16)
    first = load(root, cache_dir)
    assert (cache_dir / "decoded" / first.key / "images.npy").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decode_image called although the folder is cached")

    monkeypatch.setattr(decode_module, "_decode_open", no_decoding)
    second = load(root, cache_dir)
    assert second.key == first.key and second.classes == first.classes
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)


def test_changed_folder_is_decoded_again(make_tree, cache_dir):
    root = make_tree(per_class=5, size=16)
    first = load(root, cache_dir)
    Image.fromarray(noise_image(CLASS_COLOURS["red"], 16, np.random.default_rng(9))).save(root / "red" / "new.png")
    second = load(root, cache_dir)
    assert second.key != first.key and len(second) == len(first) + 1


def test_rewritten_file_changes_the_key(make_tree, cache_dir):
    root = make_tree(per_class=5, size=16)
    first = load(root, cache_dir)
    path = root / "red" / "000.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load(root, cache_dir)
    assert second.key != first.key
    assert not np.array_equal(second.images, first.images)


def test_cache_leaves_no_temporary_folders(make_tree, cache_dir):
    load(make_tree(per_class=3, size=16), cache_dir)
    assert [p.name for p in (cache_dir / "decoded").iterdir() if ".tmp" in p.name] == []


# ---------------------------------------------------------------------------- bad input
def test_corrupt_image_names_the_file(make_tree, cache_dir):
    root = make_tree(per_class=4, size=16)
    bad = root / "green" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError) as error:
        load(root, cache_dir)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


def test_skip_bad_images_counts_and_warns(make_tree, cache_dir):
    root = make_tree(per_class=4, size=16)
    (root / "green" / "broken.png").write_bytes(b"garbage")
    (root / "blue" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        images = load(root, cache_dir, skip_bad=True)
    assert images.skipped == 2 and len(images) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(root, cache_dir, skip_bad=True).skipped == 2  # remembered by the cache


def test_class_with_only_bad_images_is_an_error_even_when_skipping(make_tree, cache_dir):
    root = make_tree(per_class=3, size=16)
    (root / "zebra").mkdir()
    (root / "zebra" / "a.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="zebra"):
        load(root, cache_dir, skip_bad=True)


def test_empty_class_folder_names_the_folder(make_tree, cache_dir):
    root = make_tree(per_class=3, size=16)
    (root / "purple").mkdir()
    (root / "purple" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as error:
        load(root, cache_dir)
    assert str(root / "purple") in str(error.value) and "\n" not in str(error.value)


def test_folder_without_class_folders(tmp_path, cache_dir):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        load(tmp_path / "flat", cache_dir)


def test_missing_path(tmp_path, cache_dir):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nowhere", cache_dir)


def test_file_instead_of_folder(tmp_path, cache_dir):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load(tmp_path / "a.png", cache_dir)


def test_load_images_follows_the_config(image_tree, cache_dir):
    images = load_images(tiny_config(image_tree, cache_dir))
    assert len(images) == 45 and (cache_dir / "decoded" / images.key).is_dir()


# ---------------------------------------------------------------------------- CIFAR-10
def test_cifar10_offline_without_data_is_a_clear_error(tmp_path, cache_dir):
    with pytest.raises(DataError) as error:
        load_cifar10(str(tmp_path / "empty"), cache_dir, download=False)
    text = str(error.value)
    assert "--data-dir" in text and "TRANSFERLAB_DATA_DIR" in text and "\n" not in text


def test_cifar10_data_dir_from_environment(tmp_path, cache_dir, monkeypatch):
    write_fake_cifar(tmp_path / "env")
    monkeypatch.setenv("TRANSFERLAB_DATA_DIR", str(tmp_path / "env"))
    assert len(load_cifar10(None, cache_dir, download=False)) == 100


def test_cifar10_local_batches(tmp_path, cache_dir):
    folder = write_fake_cifar(tmp_path / "data")
    images = load_cifar10(str(tmp_path / "data"), cache_dir, download=False)
    assert images.classes[0] == "airplane" and len(images.classes) == 10
    assert images.images.shape == (100, 32, 32, 3) and images.labels.tolist()[:12] == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        0,
        1,
    ]
    assert images.test_images.shape == (30, 32, 32, 3) and len(images.test_labels) == 30
    # rows are CHW planes: pixel (0, 0) of image 0 is (R[0], G[0], B[0])
    with open(folder / "data_batch_1", "rb") as handle:
        row = pickle.load(handle)["data"][0]
    assert images.images[0, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert images.images[0, 1, 2].tolist() == [row[34], row[1024 + 34], row[2048 + 34]]
    again = load_cifar10(str(tmp_path / "data"), cache_dir, download=False)
    assert again.key == images.key
    np.testing.assert_array_equal(again.test_images, images.test_images)


def test_cifar10_official_test_split_in_a_run(tmp_path):
    from transferlab import RunConfig, train

    write_fake_cifar(tmp_path / "data", per_batch=10, test=20)
    config = RunConfig.from_dict(
        {
            "data": "cifar10",
            "data_dir": str(tmp_path / "data"),
            "download": False,
            "official_test": True,
            "weights": "none",
            "epochs": 1,
            "batch_size": 25,
            "val_fraction": 0.2,
            "device": "cpu",
            "cache_dir": str(tmp_path / "cache"),
            "progress": False,
        }
    )
    result = train(config, tmp_path / "run", log=lambda text: None)

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_test"] == 0 and metrics["n_train"] + metrics["n_val"] == 50 and len(result.history) == 1


# ---------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize("damage", ["truncated", "not a dict", "no label_names"])
def test_a_damaged_cifar_batches_meta_is_one_line(damage, tmp_path, capsys):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    meta = pickle.dumps({"label_names": ["a", "b"]})
    content = {"truncated": meta[: len(meta) // 2], "not a dict": pickle.dumps([1, 2]),
               "no label_names": pickle.dumps({"names": []})}[damage]  # fmt: skip
    (folder / "batches.meta").write_bytes(content)
    args = ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--no-download", "--out",
            str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--weights", "none"]  # fmt: skip
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "batches.meta")
