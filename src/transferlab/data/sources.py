"""Image sources: an ImageFolder tree, a labels file (CSV / TSV) and CIFAR-10, each file once, decoded into an
ImageSet through the decode cache; `load_images` is the one entry a run config goes through."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from ..errors import DataError
from ..errors import one_line as _one_line
from .cache import cache_load, cache_save, decode_cache_key, decode_cached
from .decode import IMAGE_EXTENSIONS, MAX_MIXED_SIDE, fit_to_square
from .imageset import SPLIT_PARTS, ImageSet
from .split import check_given_split


def image_entries(folder: Path) -> list[os.DirEntry]:
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


@dataclass
class SourceFiles:
    """The image files a source names, each real file once: what decoding reads and the caches are keyed by."""

    classes: list[str]
    files: list[tuple[str, int]]  # (path, label); plain strings: 50,000 Path objects alone cost a second
    fingerprint: str  # where the files are and what they hold: names, sizes, modification times (the decode key)
    duplicates: int = 0  # paths dropped because they reached a file already listed (a link, another spelling)


def file_identity(stat: os.stat_result) -> tuple[int, int] | None:
    """The real file behind a path, (device, inode), however it was reached; None where the system gives none."""
    return (stat.st_dev, stat.st_ino) if stat.st_ino else None


def warn_duplicates(source: str, duplicates: int) -> None:
    if duplicates:
        warnings.warn(
            f"{source}: {duplicates} path{'s' * (duplicates != 1)} reached an image already listed (a link or another "
            "spelling of the same file): each image is counted once",
            stacklevel=3,
        )


def scan_image_folder(root: Path) -> SourceFiles:
    """<root>/<class>/<image> -> the classes, each real file once with its label, and the folder's fingerprints
    (a changed folder gets a new decode cache). A file reached by two paths inside its class (a symlink or hard link)
    is listed once and counted in `duplicates`; one reached from two classes is an error. Empty classes are errors."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder (expected <root>/<class>/<image>)")
    root = Path(os.path.abspath(root))  # one spelling of each file's path: ./data/../data is data
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {root} has no class folders (expected <root>/<class>/<image>)")
    digest = hashlib.sha256(f"{root.resolve()}".encode())
    files: list[tuple[str, int]] = []
    owner: dict[tuple[int, int], tuple[str, int]] = {}  # real file -> first path and its class
    duplicates = 0
    for label, name in enumerate(classes):
        entries = image_entries(root / name)
        if not entries:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        for entry in entries:
            stat = _stat(entry)
            real = file_identity(stat)
            if real is not None and real in owner:
                first, first_label = owner[real]
                if first_label != label:  # one file in two classes would carry two labels
                    raise DataError(
                        f"{entry.path} and {first} are one file in two classes ({classes[first_label]}, "
                        f"{name}): a link between class folders?"
                    )
                duplicates += 1  # the same image twice would sit in two splits: a test image trained on
                continue
            if real is not None:
                owner[real] = (entry.path, label)
            digest.update(f"{entry.path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            files.append((entry.path, label))
    warn_duplicates(f"data folder {root}", duplicates)
    return SourceFiles(classes, files, digest.hexdigest(), duplicates)


def load_image_folder(
    root: str | Path,
    cache_dir: Path,
    *,
    storage_size: int | None = None,
    policy: str = "crop",
    skip_bad: bool = False,
    progress: bool = True,
    side: int | None = None,
) -> ImageSet:
    """A folder decoded to squares of at most `storage_size` (None: the images' own size) by `policy`, or of exactly
    `side`, cached."""
    root = Path(root).expanduser()
    source = scan_image_folder(root)
    classes = source.classes
    exact = {} if side is None else {"side": side}  # absent by default: the keys of earlier caches stay valid
    key = decode_cache_key("folder", source.fingerprint, storage_size=storage_size, policy=policy, skip_bad=skip_bad,
                           max_mixed_side=MAX_MIXED_SIDE, pillow=PIL.__version__, **exact)  # fmt: skip

    def check(labels: np.ndarray) -> dict:
        if len(np.unique(labels)) < len(classes):
            present = set(labels.tolist())
            empty = [c for i, c in enumerate(classes) if i not in present]
            raise DataError(f"class folder {root / empty[0]} has no readable images")
        return {"classes": classes, "root": str(root)}

    images, labels, meta = decode_cached(cache_dir / "decoded" / key, root, source.files, classes, check,
                                          storage_size=storage_size, policy=policy, skip_bad=skip_bad,
                                          progress=progress, side=side)  # fmt: skip
    return ImageSet(images, labels, meta["classes"], key, skipped=meta["skipped"], storage_size=storage_size,
                    resize_policy=policy, duplicates=source.duplicates)  # fmt: skip


# ------------------------------------------------------------------------------ labels file (CSV / TSV)
@dataclass
class LabelRows:
    """A labels file, parsed and checked: one entry per row, in file order."""

    paths: list[str]  # absolute
    names: list[str]  # label per row
    parts: list[int] | None  # index into SPLIT_PARTS per row, when the file has the split column
    split_column: str | None
    fingerprint: str  # the file's content and path, and each image's path, size and modification time
    duplicates: int = 0  # rows dropped because they named an image already listed


def _delimiter(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",\t;").delimiter
    except csv.Error:
        return ","


def read_labels_file(
    path: str | Path,
    *,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str | None = "split",
    skip_bad: bool = False,
) -> LabelRows:
    """Parse and check a labels file; every problem is one DataError naming the file and the row (header = row 1).

    The split column is used when the file has it; a name other than the default "split" must be there. A missing
    image is an error, or with skip_bad left for decoding to skip and count like any unreadable file.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read labels file {path}: {_one_line(error)}") from None
    if not text.strip():
        raise DataError(f"labels file {path} is empty (expected a header row naming {path_column} and {label_column})")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text))
    header = [name.strip() for name in next(reader)]
    for column, option in ((path_column, "path"), (label_column, "label")):
        if column not in header:
            raise DataError(
                f"labels file {path} has no column {column!r} (columns: {', '.join(header)}); "
                f"name it with --labels-{option}-column"
            )
    if split_column is not None and split_column not in header:
        if split_column != "split":
            raise DataError(f"labels file {path} has no column {split_column!r} (columns: {', '.join(header)})")
        split_column = None
    at = {name: header.index(name) for name in (path_column, label_column, split_column) if name is not None}
    folder = path.resolve().parent
    digest = hashlib.sha256(f"{path.resolve()}\n{text}".encode())
    rows = LabelRows([], [], [] if split_column else None, split_column, "")
    seen: dict[object, tuple[int, str, str | None]] = {}  # real file (or path) -> its first row, label and part
    try:
        for cells in reader:
            row = reader.line_num
            where = f"labels file {path}, row {row}"
            if not any(cell.strip() for cell in cells):
                continue  # blank line
            if len(cells) < len(header):
                raise DataError(f"{where}: {len(cells)} of {len(header)} columns")
            image, label = cells[at[path_column]].strip(), cells[at[label_column]].strip()
            if not image:
                raise DataError(f"{where}: empty {path_column}")
            if not label:
                raise DataError(f"{where}: empty {label_column} for {image}")
            full = os.path.normpath(folder / Path(image).expanduser())
            part = cells[at[split_column]].strip().lower() if split_column is not None else None
            if part is not None and part not in SPLIT_PARTS:
                raise DataError(f"{where}: {split_column} {part!r} is not one of train, val, test")
            try:
                stat = os.stat(full)
                digest.update(f"{full}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
                real = file_identity(stat) or full
            except OSError as error:
                if not skip_bad:
                    raise DataError(f"{where}: cannot read image {full}: {_one_line(error)}") from None
                digest.update(f"{full}|missing\n".encode())
                real = full
            if real in seen:  # the same image by another path (or the same one again): once, or a conflict
                first, first_label, first_part = seen[real]
                again = f"{image} is the image of row {first}"
                if first_label != label:
                    raise DataError(f"{where}: {again} with another label ({first_label!r}, here {label!r})")
                if first_part != part:
                    raise DataError(f"{where}: {again} in another part of the split ({first_part}, here {part}): "
                                    "a test image would be a training image")  # fmt: skip
                rows.duplicates += 1
                continue
            seen[real] = (row, label, part)
            if part is not None:
                rows.parts.append(SPLIT_PARTS.index(part))
            rows.paths.append(full)
            rows.names.append(label)
    except csv.Error as error:
        raise DataError(f"labels file {path}, row {reader.line_num}: {_one_line(error)}") from None
    if not rows.paths:
        raise DataError(f"labels file {path} has a header but no rows")
    if rows.parts is not None:
        check_given_split(np.asarray(rows.parts), f"labels file {path}", split_column)
    rows.fingerprint = digest.hexdigest()
    warn_duplicates(f"labels file {path}", rows.duplicates)
    return rows


def load_labels_file(
    path: str | Path,
    cache_dir: Path,
    *,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str | None = "split",
    storage_size: int | None = None,
    policy: str = "crop",
    skip_bad: bool = False,
    progress: bool = True,
    side: int | None = None,
) -> ImageSet:
    """A labels file's images, decoded as an image folder's are (same decoder, same cache; `side`: exactly that
    side). Classes: the sorted unique labels. With a split column, ImageSet.given_split holds each kept row's part."""
    path = Path(path).expanduser()
    rows = read_labels_file(
        path, path_column=path_column, label_column=label_column, split_column=split_column, skip_bad=skip_bad
    )
    columns = [path_column, label_column, rows.split_column]
    exact = {} if side is None else {"side": side}  # absent by default: the keys of earlier caches stay valid
    key = decode_cache_key("labels", rows.fingerprint, columns=columns, storage_size=storage_size, policy=policy,
                           skip_bad=skip_bad, max_mixed_side=MAX_MIXED_SIDE, pillow=PIL.__version__,
                           **exact)  # fmt: skip
    classes = sorted(set(rows.names))
    index = {name: i for i, name in enumerate(classes)}

    def check(kept: np.ndarray) -> dict:
        labels_of = [rows.names[i] for i in kept]
        missing = sorted(set(classes) - set(labels_of))
        if missing:
            raise DataError(f"labels file {path}: label {missing[0]!r} has no readable images")
        meta = {"classes": classes, "root": str(path), "rows": kept.tolist()}
        if rows.parts is not None:
            given = np.asarray(rows.parts, dtype=np.int8)[kept]
            if len(kept) < len(rows.paths):
                check_given_split(given, f"labels file {path} without its unreadable images", rows.split_column)
            meta["given_split"] = given.tolist()
        return meta

    # Each file's "label" while decoding is its row, so the rows kept (skip_bad) are known afterwards.
    files = list(zip(rows.paths, range(len(rows.paths))))
    images, kept, meta = decode_cached(cache_dir / "decoded" / key, path, files, classes, check,
                                        storage_size=storage_size, policy=policy, skip_bad=skip_bad,
                                        progress=progress, side=side)  # fmt: skip
    kept = np.asarray(meta["rows"], dtype=np.int64)
    labels = np.asarray([index[rows.names[i]] for i in kept], dtype=np.int64)
    given = meta.get("given_split")
    given = None if given is None else np.asarray(given, dtype=np.int8)
    return ImageSet(images, labels, classes, key, skipped=meta["skipped"], given_split=given,
                    storage_size=storage_size, resize_policy=policy, duplicates=rows.duplicates)  # fmt: skip


# ------------------------------------------------------------------------------ CIFAR-10
CIFAR_FOLDER = "cifar-10-batches-py"


def cifar10_dir(data_dir: str | None) -> Path:
    return Path(
        data_dir or os.environ.get("TRANSFERLAB_DATA_DIR") or Path.home() / ".cache" / "transferlab" / "data"
    ).expanduser()


def load_cifar10(data_dir: str | None, cache_dir: Path, *, download: bool = True, side: int | None = None) -> ImageSet:
    root = cifar10_dir(data_dir)
    folder = root / CIFAR_FOLDER
    if not (folder / "batches.meta").exists():
        if not download:
            raise DataError(
                f"CIFAR-10 is not in {folder}: point --data-dir (or TRANSFERLAB_DATA_DIR) at the folder holding "
                f"{CIFAR_FOLDER}, or allow --download"
            )
        try:
            from torchvision.datasets import CIFAR10  # only the cifar10 source needs torchvision's datasets

            CIFAR10(str(root), train=True, download=True)
        except Exception as error:  # noqa: BLE001 - any network failure ends in the same advice
            raise DataError(
                f"CIFAR-10 is not in {folder} and could not be downloaded ({type(error).__name__}): point --data-dir "
                f"(or TRANSFERLAB_DATA_DIR) at a folder holding {CIFAR_FOLDER}, or pass --data PATH to an image folder"
            ) from None
    digest = hashlib.sha256(f"{folder.resolve()}".encode())
    for name in sorted(os.listdir(folder)):
        entry = f"{name}|{(folder / name).stat().st_size}"
        digest.update(entry.encode())
    key = decode_cache_key("cifar10", digest.hexdigest())
    cached = cache_load(cache_dir / "decoded" / key)
    if cached is None:

        def read(names):
            xs, ys = [], []
            for name in names:
                batch = _cifar_pickle(folder / name, "batch")
                try:
                    xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    ys.append(np.asarray(batch["labels"], dtype=np.int64))
                except (KeyError, TypeError, ValueError) as error:
                    raise DataError(
                        f"CIFAR-10 batch {folder / name} is not a CIFAR-10 batch ({_one_line(error)})"
                    ) from None
            return np.concatenate(xs), np.concatenate(ys)

        try:
            classes = [str(c) for c in _cifar_pickle(folder / "batches.meta", "class list")["label_names"]]
        except (KeyError, TypeError) as error:
            raise DataError(
                f"CIFAR-10 class list {folder / 'batches.meta'} has no label_names ({_one_line(error)})"
            ) from None
        train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
        test_x, test_y = read(["test_batch"])
        images = np.concatenate([train_x, test_x])
        labels = np.concatenate([train_y, test_y])
        cache_save(cache_dir / "decoded" / key, images, labels, {"classes": classes, "n_train": len(train_y)})
        cached = (images, labels, {"classes": classes, "n_train": len(train_y)})
    images, labels, meta = cached
    n = meta["n_train"]
    if side is not None and side != images.shape[1]:  # stored as another run stored its files: each image resized
        images = np.stack([np.asarray(fit_to_square(Image.fromarray(x), side, "crop")) for x in images])
    return ImageSet(images[:n], labels[:n], meta["classes"], key, test_images=images[n:], test_labels=labels[n:])


def _cifar_pickle(path: Path, what: str) -> dict:
    """One of CIFAR-10's pickled files, or a one-line DataError (missing, truncated, not a pickle of a dict)."""
    try:
        with open(path, "rb") as handle:
            value = pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError) as error:  # fmt: skip
        raise DataError(
            f"cannot read CIFAR-10 {what} {path}: {_one_line(error)} (a truncated or damaged file?)"
        ) from None
    if not isinstance(value, dict):
        raise DataError(f"cannot read CIFAR-10 {what} {path}: it holds a {type(value).__name__}, not a dict")
    return value


STORAGE_SIZE_INPUTS = ("resolution", "crop_fraction", "storage_size")  # the options storage_size_for reads


def storage_size_for(config) -> int:
    """The side a run's images are stored at, at most: --storage-size, else what its centre crop of --resolution
    needs (timm's 224 px at crop_pct 0.875: 256)."""
    if config.resolution is None or config.crop_fraction is None:
        raise ValueError(
            f"RunConfig(arch={config.arch!r}) leaves its resolution or crop fraction to its backbone: pass "
            "transferlab.resolve(config), the config with its backbone's defaults filled in"
        )
    return config.storage_size or math.ceil(config.resolution / config.crop_fraction - 1e-9)


def load_images(config, storage_size: int | None = None, *, side: int | None = None) -> ImageSet:
    """The data set a RunConfig names, stored at most `storage_size` (default storage_size_for(config)) square, or,
    with `side`, at exactly that side (every file as a run that stored its images at `side` saw it).

    CIFAR-10's 32 x 32 images are never enlarged, so they are the same arrays at any storage size."""
    cache_dir = config.resolved_cache_dir()
    common = {"storage_size": storage_size or storage_size_for(config), "policy": config.resize_policy,
              "skip_bad": config.skip_bad_images, "progress": config.progress, "side": side}  # fmt: skip
    if config.labels is not None:
        return load_labels_file(config.labels, cache_dir, path_column=config.labels_path_column,
                                label_column=config.labels_label_column, split_column=config.labels_split_column,
                                **common)  # fmt: skip
    if config.data == "cifar10":
        images = load_cifar10(config.data_dir, cache_dir, download=config.download, side=side)
        images.resize_policy = config.resize_policy  # square already; predict applies it to other files
        return images
    return load_image_folder(config.data, cache_dir, **common)
