"""tests/data/test_storage_size.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    SHARED_CIFAR,
    assert_one_line_error,
    make_image_tree,
    photo,
    photo_tree,
    quiet,
    tiny_config,
    train_args,
    write_fake_cifar,
)
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from transferlab import RunConfig
from transferlab.cli import main
from transferlab.config.study import StudySpec
from transferlab.data.cache import decode_cache_key
from transferlab.data.decode import decode_image, fit_to_square
from transferlab.data.imageset import ImageSet
from transferlab.data.sources import load_image_folder, load_images, storage_size_for
from transferlab.engine.features import FeatureCache
from transferlab.engine.preprocess import dataset_statistics
from transferlab.engine.train import run_training
from transferlab.errors import ConfigError
from transferlab.inference.evaluate import evaluate_checkpoint
from transferlab.models.registry import resolve
from transferlab.study.plan import config_for, study_storage_size


def load(root, cache_dir, **kwargs):
    return load_image_folder(root, cache_dir, progress=False, **kwargs)


def striped(width: int = 40, height: int = 24) -> Image.Image:
    """Red left 8 columns, blue right 8, grey between."""
    array = np.full((height, width, 3), 128, np.uint8)
    array[:, :8] = (255, 0, 0)
    array[:, -8:] = (0, 0, 255)
    return Image.fromarray(array)


def plain_decode(path) -> np.ndarray:
    """How a file was decoded before storage sizes: the whole image, RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def in_memory(images: ImageSet) -> ImageSet:
    return ImageSet(np.array(images.images), images.labels, images.classes, images.key, **sizes(images))


def sizes(images: ImageSet) -> dict:
    return {"storage_size": images.storage_size, "resize_policy": images.resize_policy}


# ---------------------------------------------------------------------------- bounded decoding
def test_a_large_jpeg_is_reduced_while_decoded(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    photo(800, 600).save(path, quality=90)
    drafts = []
    real_draft = JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafts.append((mode, size, self.size))
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    array = decode_image(path, 64)
    assert array.shape == (64, 64, 3)
    # 1/8 would go below 64 on the short side (600 / 8 = 75 is fine, 800 / 8 = 100): decoded at 100 x 75, not 800 x 600
    assert drafts == [("RGB", (64, 64), (100, 75))]
    drafts.clear()
    assert decode_image(path, 400).shape == (400, 400, 3) and drafts == []  # 600 < 2 x 400: nothing to gain


def test_a_folder_of_large_jpegs_is_stored_at_the_storage_size(tmp_path, cache_dir):
    root = photo_tree(tmp_path / "big", (800, 600), per_class=2)
    images = load(root, cache_dir, storage_size=32)
    assert images.images.shape == (6, 32, 32, 3) and images.storage_size == 32


def test_images_are_never_enlarged(tmp_path, cache_dir):
    small = make_image_tree(tmp_path / "small", per_class=3, size=16)
    assert load(small, cache_dir, storage_size=64).images.shape == (9, 16, 16, 3)
    wide = photo_tree(tmp_path / "wide", (40, 24), per_class=2, ext="png")
    assert load(wide, cache_dir, storage_size=64).images.shape == (6, 24, 24, 3)
    assert load(wide, cache_dir, storage_size=64, policy="pad").images.shape == (6, 40, 40, 3)
    assert decode_image(wide / "a" / "0.png", 64, upscale=False).shape == (24, 24, 3)


# ---------------------------------------------------------------------------- the policy
def test_crop_keeps_the_centre_square():
    out = np.asarray(fit_to_square(striped(), 24, "crop"))
    assert out.shape == (24, 24, 3) and (out == 128).all()
    assert np.asarray(fit_to_square(striped(), 12, "crop")).shape == (12, 12, 3)


def test_squash_keeps_the_whole_image():
    out = np.asarray(fit_to_square(striped(), 24, "squash")).astype(int)
    assert out.shape == (24, 24, 3)
    assert out[:, 0, 0].min() > 200 and out[:, -1, 2].min() > 200  # both stripes still there, narrower
    assert (out[:, 12] == 128).all()


def test_pad_letterboxes_in_black():
    out = np.asarray(fit_to_square(striped(), 40, "pad"))
    assert out.shape == (40, 40, 3)
    assert (out[:8] == 0).all() and (out[32:] == 0).all()  # black bars above and below
    np.testing.assert_array_equal(out[8:32], np.asarray(striped()))  # the image itself, unscaled
    small = np.asarray(fit_to_square(striped(), 20, "pad"))
    assert small.shape == (20, 20, 3) and (small[:4] == 0).all() and (small[16:] == 0).all()


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="zoom"):
        fit_to_square(striped(), 8, "zoom")


# ---------------------------------------------------------------------------- the cache key
def test_cache_key_changes_with_storage_size_and_policy(tmp_path, cache_dir):
    assert decode_cache_key("folder", "x", storage_size=32, policy="crop") != decode_cache_key(
        "folder", "x", storage_size=64, policy="crop"
    )
    root = make_image_tree(tmp_path / "t", per_class=3, size=16)
    keys = {load(root, cache_dir, storage_size=s, policy=p).key for s in (8, 16) for p in ("crop", "squash", "pad")}
    assert len(keys) == 6


# ---------------------------------------------------------------------------- CIFAR-10 unchanged
def test_cifar_jpeg_arrays_are_unchanged_at_32_and_128(tmp_path, cache_dir):
    if SHARED_CIFAR.is_dir():  # the real shared JPEGs, 20 per class
        root = tmp_path / "cifar"
        for folder in sorted(p for p in SHARED_CIFAR.iterdir() if p.is_dir()):
            (root / folder.name).mkdir(parents=True)
            for file in sorted(folder.iterdir())[:20]:
                shutil.copy(file, root / folder.name / file.name)
    else:
        root = make_image_tree(tmp_path / "cifar", per_class=20, size=32, ext="jpg")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    expected = np.stack([plain_decode(p) for p in files])
    for resolution in (32, 128):
        images = load_images(tiny_config(root, cache_dir, resolution=resolution))
        np.testing.assert_array_equal(images.images, expected)


def test_cifar10_source_arrays_are_unchanged_at_32_and_128(tmp_path, cache_dir):
    folder = write_fake_cifar(tmp_path / "data")
    raw = np.load(folder / "data_batch_1", allow_pickle=True, encoding="latin1")["data"]
    first = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for resolution in (32, 128):
        config = resolve(RunConfig(data="cifar10", data_dir=str(tmp_path / "data"), cache_dir=str(cache_dir),
                                   resolution=resolution))  # fmt: skip
        images = load_images(config)
        assert images.images.shape == (100, 32, 32, 3)
        np.testing.assert_array_equal(images.images[:20], first)


# ---------------------------------------------------------------------------- memory-mapped cache
def test_cache_is_memory_mapped_copy_on_write(tmp_path, cache_dir):
    root = make_image_tree(tmp_path / "t", per_class=3, size=16)
    first = load(root, cache_dir)
    again = load(root, cache_dir)
    for images in (first, again):
        assert isinstance(images.images, np.memmap) and images.images.flags.writeable
    path = cache_dir / "decoded" / again.key / "images.npy"
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        tensor = torch.from_numpy(again.images)
    tensor[0] = 0  # in memory only
    assert path.read_bytes() == before
    meta = json.loads((path.parent / "meta.json").read_text())
    streamed = hashlib.sha256(before + (path.parent / "labels.npy").read_bytes()).hexdigest()
    assert meta["sha256"] == streamed


@pytest.mark.parametrize(
    "options", [dict(strategy="frozen", normalize="dataset", flip=True), dict(strategy="full", crop_padding=2)]
)
def test_training_on_the_mapped_cache_equals_an_in_memory_array(image_tree, tmp_path, options):
    config = tiny_config(image_tree, tmp_path / "cache", epochs=2, **options)
    mapped = load_images(config)
    assert isinstance(mapped.images, np.memmap)
    runs = {}
    for name, images in (("mapped", mapped), ("memory", in_memory(mapped))):
        result = run_training(config, tmp_path / name, images=images, feature_cache=FeatureCache(None), log=quiet)
        runs[name] = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    assert runs["mapped"] == runs["memory"]
    checkpoint = tmp_path / "mapped" / "best.pt"
    a = evaluate_checkpoint(checkpoint, mapped, device="cpu")
    b = evaluate_checkpoint(checkpoint, in_memory(mapped), device="cpu")
    assert a == b


def test_streamed_statistics_equal_the_old_formula(tmp_path):
    rng = np.random.default_rng(0)
    array = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(23, 9, 11, 3))
    array[:] = rng.integers(0, 256, array.shape, dtype=np.uint8)
    rows = np.sort(rng.choice(23, 15, replace=False))
    old = torch.as_tensor(np.array(array[rows])).reshape(-1, 3).double() / 255.0
    mean, std = dataset_statistics(np.load(tmp_path / "x.npy", mmap_mode="c"), rows, chunk_pixels=150)
    np.testing.assert_allclose(mean, old.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(std, old.std(0).numpy(), atol=1e-6)
    everything = torch.as_tensor(np.array(array)).reshape(-1, 3).double() / 255.0
    np.testing.assert_allclose(dataset_statistics(array)[1], everything.std(0).numpy(), atol=1e-6)


def test_a_file_failing_only_when_decoded_is_skipped_and_rows_compacted(tmp_path, cache_dir):
    root = photo_tree(tmp_path / "t", (64, 48), per_class=4)
    data = (root / "b" / "1.jpg").read_bytes()
    (root / "b" / "1.jpg").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    full = load(photo_tree(tmp_path / "ref", (64, 48), per_class=4), cache_dir)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        images = load(root, cache_dir, skip_bad=True)
    assert images.images.shape == (11, 48, 48, 3) and images.skipped == 1
    keep = np.arange(12) != 5  # b/1.jpg: the 6th file
    np.testing.assert_array_equal(images.images, full.images[keep])
    np.testing.assert_array_equal(images.labels, full.labels[keep])
    np.testing.assert_array_equal(load(root, cache_dir, skip_bad=True).images, images.images)  # cached the same


# ---------------------------------------------------------------------------- studies
def test_a_study_decodes_once_at_its_largest_resolution():
    spec = StudySpec.from_dict({"run": {"data": "folder", "storage_size": None}, "grid": {"resolution": [16, 64, 32]}})
    configs = [config_for(spec, p) for p in spec.points()]
    assert {study_storage_size(spec, c) for c in configs} == {64}
    other = StudySpec.from_dict({"run": {"data": "folder", "storage_size": 96}, "grid": {"resolution": [16, 32]}})
    assert study_storage_size(other, config_for(other, other.points()[0])) == 96


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "values, fragment",
    [({"storage_size": 0}, "storage_size = 0: must be >= 8"), ({"resize_policy": "zoom"}, "resize_policy = 'zoom'")],
)
def test_bad_values_are_one_line_errors(values, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        RunConfig.from_dict(values)
    assert "\n" not in str(error.value)


def test_bad_storage_size_through_the_cli(image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--storage-size", "0")) == 2
    assert_one_line_error(capsys.readouterr(), "storage_size = 0")
    assert not (tmp_path / "run").exists()
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--set", "resize_policy=zoom")) == 2
    assert_one_line_error(capsys.readouterr(), "resize_policy = 'zoom': expected one of crop, squash, pad")
    with pytest.raises(SystemExit) as exit_status:  # argparse's own check of the flag's choices
        main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--resize-policy", "zoom"))
    assert exit_status.value.code == 2


def test_storage_size_is_the_resolution_by_default(image_tree, cache_dir):
    assert load_images(tiny_config(image_tree, cache_dir, resolution=16)).images.shape[1:] == (16, 16, 3)
    assert load_images(tiny_config(image_tree, cache_dir, resolution=16, storage_size=20)).images.shape[1:3] == (20, 20)
    assert storage_size_for(tiny_config(image_tree, cache_dir, resolution=48)) == 48


@pytest.mark.parametrize("first", [16, 24])
def test_mixed_sizes_share_the_median_side_whatever_the_first_file(tmp_path, cache_dir, first):
    root = tmp_path / "mixed"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i, size in enumerate([first, 24, 24, 32] if name == "a" else [24, 16, 40]):
            photo(size, size + 4, seed=i).save(root / name / f"{i}.png")
    images = load(root, cache_dir)
    files = sorted(root.rglob("*.png"))
    assert images.images.shape == (7, 24, 24, 3)
    np.testing.assert_array_equal(images.images, np.stack([decode_image(p, 24) for p in files]))


def test_a_photo_taken_sideways_is_decoded_upright(tmp_path):
    """EXIF orientation 6 (rotate 90 degrees clockwise to view): stored pixels are turned as a viewer shows them."""
    from transferlab.data.decode import decode_image

    pixels = np.zeros((40, 60, 3), dtype=np.uint8)  # landscape as stored, the top row white
    pixels[:4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "side.jpg", exif=exif.tobytes(), quality=95)
    upright = decode_image(tmp_path / "side.jpg", policy="squash")
    assert upright.shape == (40, 40, 3)
    assert upright[:, -3:].mean() > 200 and upright[:, :3].mean() < 50  # the white band is now on the right
