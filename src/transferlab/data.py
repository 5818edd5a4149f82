"""Image sources, decoded once into uint8 arrays and cached on disk, and the stratified splits.

A data set here is three arrays: images (N, H, W, 3) uint8, labels (N,) int64, class names.
Everything after this module works on those tensors; no file is opened on the training path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import secrets
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedShuffleSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CACHE_FORMAT = 2  # 2: 16-bit images scaled, skip_bad and Pillow's version in the key, sha256 in meta.json
MAX_MIXED_SIDE = 256  # mixed-size folders are stored at most this large, so big photos fit in memory
STALE_SECONDS = 3600  # a *.tmp-* / *.old-* cache folder this old belongs to a killed writer


class DataError(RuntimeError):
    """Input data is missing or unreadable (message is one line naming the file or folder)."""


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    key: str  # identifies the decoded content; keys the feature cache
    test_images: np.ndarray | None = None  # an official test split, when the source has one
    test_labels: np.ndarray | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------ decoding
def decode_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """One file -> (H, W, 3) uint8 RGB; grey, 16-bit grey, RGBA and palette images are converted.

    Any failure is a one-line DataError naming the file, including an image over Pillow's decompression-bomb
    limit (2 x PIL.Image.MAX_IMAGE_PIXELS). Pillow's warning for images between 1x and 2x that limit is
    silenced by decode_folder (they decode normally); where it is turned into an error it is a DataError too.
    """
    try:
        with Image.open(path) as image:
            image = _to_8bit(image).convert("RGB")
            if size is not None and image.size != size:
                image = _center_crop_resize(image, size)
            return np.asarray(image, dtype=np.uint8)
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        raise DataError(f"cannot decode image {path}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _to_8bit(image: Image.Image) -> Image.Image:
    """Integer grey images (16-bit "I;16*", 32-bit "I") scaled to "L": convert("RGB") would clip them at 255.

    "I" images whose values fit 0..65535 (16-bit PGM, TIFF) are 16-bit data; larger values scale from 2**31 - 1.
    Float images ("F", e.g. 32-bit TIFF) holding 0..1 are scaled by 255 (convert would make them black); others are
    read as 0..255.
    """
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.int64)
    top = 65535 if values.max(initial=0) <= 65535 else 2**31 - 1
    return Image.fromarray(((np.clip(values, 0, top) * 255 + top // 2) // top).astype(np.uint8))


def _center_crop_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize(size, Image.BILINEAR)


def _image_entries(folder: Path) -> list[os.DirEntry]:
    """Image files below `folder`, any depth (os.scandir: one stat per file, no pathlib overhead).

    Names starting with "." are skipped, files as well as folders (macOS "._x.jpg" files are not images).
    Symlinked folders are followed, but each real folder is read once: a link loop ends, a folder linked twice
    counts once. A symlink with an image name that leads nowhere (dangling, looping) is listed, so decoding
    reports it as unreadable (an error, or skipped and counted with skip_bad_images).
    """
    found, pending, seen = [], [str(folder)], set()
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if _is_dir(entry):
                        pending.append(entry.path)
                    elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and (entry.is_symlink() or entry.is_file()):
                        found.append(entry)
        except OSError as error:
            raise DataError(f"cannot read folder {current}: {_one_line(error)}") from None
    return sorted(found, key=lambda e: e.path)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (ELOOP): not a folder
        return False


def _stat(entry: os.DirEntry) -> os.stat_result:
    try:
        return entry.stat()
    except OSError:  # dangling or looping link: its own stat, decoding reports it
        return entry.stat(follow_symlinks=False)


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]], str]:
    """<root>/<class>/<image> -> class names, (file, label) pairs, and a fingerprint of names, sizes and
    modification times (a changed folder gets a new decode cache). Empty classes are errors."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder (expected <root>/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {root} has no class folders (expected <root>/<class>/<image>)")
    digest = hashlib.sha256(f"{root.resolve()}".encode())
    files: list[tuple[str, int]] = []  # plain strings: 50,000 Path objects alone cost a second
    for label, name in enumerate(classes):
        entries = _image_entries(root / name)
        if not entries:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        for entry in entries:
            stat = _stat(entry)
            digest.update(f"{entry.path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            files.append((entry.path, label))
    return classes, files, digest.hexdigest()


def decode_cache_key(kind: str, fingerprint: str, **settings) -> str:
    """The decode cache key: the source's fingerprint and every other input that changes the decoded arrays
    (the cache format, and settings such as image_size, skip_bad and the decoder's version)."""
    text = json.dumps({"format": CACHE_FORMAT, "source": fingerprint, **settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def decode_folder(root: Path, files, classes, *, image_size: int | None, skip_bad: bool, progress: bool):
    """Decode every file (threads: Pillow releases the GIL while decoding)."""
    from .progress import track

    size = (image_size, image_size) if image_size else None
    bad: list[str] = []

    def load(item):
        path, label = item
        try:
            return decode_image(path, size), label
        except DataError as error:
            if not skip_bad:
                raise
            bad.append(str(error))
            return None, label

    # Images between 1x and 2x Pillow's bomb limit decode normally; without this each size warns once per run.
    # (Filters are process-wide, so they are set here, around the threads, not in decode_image.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            decoded = list(
                track(pool.map(load, files), total=len(files), description=f"decoding {root.name}", enabled=progress)
            )
    kept = [(img, lab) for img, lab in decoded if img is not None]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s), first: {bad[0]}", stacklevel=2)
    if not kept:
        raise DataError(f"no readable images in {root}")
    shapes = {img.shape for img, _ in kept}
    if len(shapes) > 1:
        # Mixed sizes: bring every image to the most common shorter side (centre crop, bilinear).
        side = min(int(np.median([min(img.shape[:2]) for img, _ in kept])), MAX_MIXED_SIDE)
        kept = [
            (np.asarray(_center_crop_resize(Image.fromarray(img), (side, side))), lab)
            if img.shape != (side, side, 3)
            else (img, lab)
            for img, lab in kept
        ]
    images = np.stack([img for img, _ in kept])
    labels = np.asarray([lab for _, lab in kept], dtype=np.int64)
    return images, labels, len(bad)


# ------------------------------------------------------------------------------ disk cache
def _checksum(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of both arrays' dtype, shape and bytes (about 0.15 s for CIFAR-10's 150 MB)."""
    digest = hashlib.sha256()
    for array in (images, labels):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


_DAMAGED = (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError)  # what reading a bad cache raises


def _cache_read(folder: Path):
    """(images, labels, meta) of a cache folder; OSError or ValueError when it is damaged."""
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy")
    labels = np.load(folder / "labels.npy")
    if meta.get("sha256") != _checksum(images, labels):
        raise ValueError("its arrays do not match the checksum in meta.json")
    return images, labels, meta


def _cache_load(folder: Path):
    """The cached arrays, or None: absent, or damaged (then one warning, and the caller rebuilds it)."""
    if not folder.exists():
        return None
    try:
        return _cache_read(folder)
    except _DAMAGED as error:
        warnings.warn(f"decode cache {folder} is damaged ({_one_line(error)}); rebuilding it", stacklevel=3)
        return None


def _cache_save(folder: Path, images, labels, meta) -> None:
    """Write a complete copy into a private temporary folder, then rename it into place.

    A valid cache already there is kept (another process wrote the same content), never deleted; a damaged one is
    renamed aside and deleted only once the new copy is in place. A killed writer leaves at most *.tmp-* / *.old-*
    folders, which no reader opens and a later save removes once they are STALE_SECONDS old. A cache that cannot be
    written is a warning: the decoded arrays are in memory and the run goes on.
    """
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp, old = folder.with_name(f"{folder.name}.tmp-{tag}"), folder.with_name(f"{folder.name}.old-{tag}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder.parent)
        tmp.mkdir()
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        (tmp / "meta.json").write_text(json.dumps({**meta, "sha256": _checksum(images, labels)}))
        if folder.exists():
            try:
                _cache_read(folder)
                return  # valid: another process wrote the same content
            except _DAMAGED:
                with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
                    os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.exists():
                raise
            # else another process put its copy in place meanwhile: as good as ours
    except OSError as error:
        warnings.warn(f"cannot write the decode cache {folder}: {_one_line(error)}", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(parent: Path) -> None:
    cutoff = time.time() - STALE_SECONDS
    for path in [*parent.glob("*.tmp*"), *parent.glob("*.old-*")]:
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def load_image_folder(
    root: str | Path, cache_dir: Path, *, image_size: int | None = None, skip_bad: bool = False, progress: bool = True
) -> ImageSet:
    root = Path(root).expanduser()
    classes, files, fingerprint = scan_image_folder(root)
    key = decode_cache_key(
        "folder",
        fingerprint,
        image_size=image_size,
        skip_bad=skip_bad,
        max_mixed_side=MAX_MIXED_SIDE,
        pillow=PIL.__version__,
    )
    cached = _cache_load(cache_dir / "decoded" / key)
    if cached is not None:
        images, labels, meta = cached
        return ImageSet(images, labels, meta["classes"], key, skipped=meta.get("skipped", 0))
    images, labels, skipped = decode_folder(
        root, files, classes, image_size=image_size, skip_bad=skip_bad, progress=progress
    )
    if len(np.unique(labels)) < len(classes):
        present = set(labels.tolist())
        empty = [c for i, c in enumerate(classes) if i not in present]
        raise DataError(f"class folder {root / empty[0]} has no readable images")
    _cache_save(
        cache_dir / "decoded" / key, images, labels, {"classes": classes, "skipped": skipped, "root": str(root)}
    )
    return ImageSet(images, labels, classes, key, skipped=skipped)


# ------------------------------------------------------------------------------ CIFAR-10
CIFAR_FOLDER = "cifar-10-batches-py"


def cifar10_dir(data_dir: str | None) -> Path:
    return Path(
        data_dir or os.environ.get("TRANSFERLAB_DATA_DIR") or Path.home() / ".cache" / "transferlab" / "data"
    ).expanduser()


def load_cifar10(data_dir: str | None, cache_dir: Path, *, download: bool = True) -> ImageSet:
    root = cifar10_dir(data_dir)
    folder = root / CIFAR_FOLDER
    if not (folder / "batches.meta").exists():
        if not download:
            raise DataError(
                f"CIFAR-10 is not in {folder}: point --data-dir (or TRANSFERLAB_DATA_DIR) at the folder holding "
                f"{CIFAR_FOLDER}, or allow --download"
            )
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
        except Exception as error:  # noqa: BLE001 - any network failure ends in the same advice
            raise DataError(
                f"CIFAR-10 is not in {folder} and could not be downloaded ({type(error).__name__}): point --data-dir "
                f"(or TRANSFERLAB_DATA_DIR) at a folder holding {CIFAR_FOLDER}, or pass --data PATH to an image folder"
            ) from None
    digest = hashlib.sha256(f"{folder.resolve()}".encode())
    for name in sorted(os.listdir(folder)):
        digest.update(f"{name}|{(folder / name).stat().st_size}".encode())
    key = decode_cache_key("cifar10", digest.hexdigest())
    cached = _cache_load(cache_dir / "decoded" / key)
    if cached is None:

        def read(names):
            xs, ys = [], []
            for name in names:
                path = folder / name
                try:
                    with open(path, "rb") as handle:
                        batch = pickle.load(handle, encoding="latin1")
                except (OSError, pickle.UnpicklingError, EOFError) as error:
                    raise DataError(f"cannot read CIFAR-10 batch {path}: {error}") from None
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(batch["labels"], dtype=np.int64))
            return np.concatenate(xs), np.concatenate(ys)

        with open(folder / "batches.meta", "rb") as handle:
            classes = pickle.load(handle, encoding="latin1")["label_names"]
        train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
        test_x, test_y = read(["test_batch"])
        images = np.concatenate([train_x, test_x])
        labels = np.concatenate([train_y, test_y])
        _cache_save(cache_dir / "decoded" / key, images, labels, {"classes": classes, "n_train": len(train_y)})
        cached = (images, labels, {"classes": classes, "n_train": len(train_y)})
    images, labels, meta = cached
    n = meta["n_train"]
    return ImageSet(images[:n], labels[:n], meta["classes"], key, test_images=images[n:], test_labels=labels[n:])


def load_images(config) -> ImageSet:
    """The data set a RunConfig names."""
    cache_dir = config.resolved_cache_dir()
    if config.data == "cifar10":
        return load_cifar10(config.data_dir, cache_dir, download=config.download)
    return load_image_folder(config.data, cache_dir, skip_bad=config.skip_bad_images, progress=config.progress)


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
) -> Split:
    """Hold out a test fraction, then a validation fraction, both stratified and seeded.

    With `official_test`, the test indices are left empty (the source's own test set is used) and
    validation is carved from the training images. Fractions are of the images in play. `classes` (the label
    names) lets the error for a class too small for the split name it.
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
    train, val = _stratified_take(indices, labels, max(int(round(val_fraction * n)), len(np.unique(labels))), seed + 1)
    return Split(train, val, test, official_test=official_test)


def split_for(images: ImageSet, config) -> Split:
    """The one way a run's data is divided: validated, seeded, stratified (see make_split)."""
    if len(images.classes) < 2:
        raise DataError(
            f"{config.data} has {len(images.classes)} class ({', '.join(images.classes)}): "
            "a classifier needs at least 2"
        )
    if config.official_test and images.test_images is None:
        raise DataError(f"official_test: {config.data} has no official test split; use test_fraction")
    return make_split(
        images.labels,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        seed=config.split_seed,
        limit=config.limit,
        official_test=config.official_test,
        classes=images.classes,
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
            f"no {name} split: the run held out no {name} images (test_fraction = 0)"
            if name == "test"
            else f"no {name} split: it holds no images"
        )
    return images.images[indices], images.labels[indices]
