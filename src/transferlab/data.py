"""Image sources, decoded once into uint8 arrays and cached on disk, and the stratified splits.

A data set here is three arrays: images (N, H, W, 3) uint8, labels (N,) int64, class names.
Everything after this module works on those tensors; no file is opened on the training path.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import pickle
import secrets
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from .errors import one_line as _one_line
from .fsutil import SPACE_MARGIN, free_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CACHE_FORMAT = 3  # 3: square storage size and policy in the key, images.npy written and read memory-mapped
ORIENTATION_TAG = 0x0112  # EXIF: how the camera was held
MAX_MIXED_SIDE = 256  # with no storage size, mixed-size folders are stored at most this large
RESIZE_POLICIES = ("crop", "squash", "pad")
CHUNK_BYTES = 16 << 20  # streamed checksums read files this much at a time
STALE_SECONDS = 3600  # a *.tmp-* / *.old-* cache folder this old belongs to a killed writer


SPLIT_PARTS = ("train", "val", "test")


class DataError(RuntimeError):
    """Input data is missing or unreadable (message is one line naming the file or folder)."""


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8; for a cached folder a copy-on-write np.memmap of images.npy
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    key: str  # identifies the decoded content; keys the feature cache
    test_images: np.ndarray | None = None  # an official test split, when the source has one
    test_labels: np.ndarray | None = None
    skipped: int = 0
    given_split: np.ndarray | None = None  # (N,) int8 index into SPLIT_PARTS, when the source names each row's part
    storage_size: int | None = None  # the largest side images were asked to be stored at (None: their own size)
    resize_policy: str = "crop"  # how a file became a square (fit_to_square)
    duplicates: int = 0  # paths dropped because they named an image already listed
    _digests: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def digests(self) -> np.ndarray:
        """(N,) uint64: each stored image's pixels hashed, computed once. Images stored alike hash alike whatever
        file, folder or source they came from: what tells a run's training images among other data."""
        if self._digests is None:
            self._digests = image_digests(self.images)
        return self._digests

    @property
    def stored_side(self) -> int:
        """The side every image is stored at: the exact square a file becomes before preprocessing."""
        return int(self.images.shape[1])


def image_digests(images: np.ndarray) -> np.ndarray:
    """(N,) uint64 hashes of uint8 (N, H, W, 3) images' bytes (blake2b, 8 bytes), a chunk of rows at a time."""
    out = np.empty(len(images), dtype=np.uint64)
    step = max(1, CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), step):
        chunk = np.ascontiguousarray(images[start : start + step])
        for i, row in enumerate(chunk):
            out[start + i] = int.from_bytes(hashlib.blake2b(row.data, digest_size=8).digest(), "little")
    return out


# ------------------------------------------------------------------------------ decoding
def decode_image(
    path: str | Path, side: int | None = None, policy: str = "crop", *, upscale: bool = True
) -> np.ndarray:
    """One file -> (side, side, 3) uint8 RGB, made square by `policy` (fit_to_square); grey, 16-bit grey, RGBA and
    palette images are converted. side None: the image's own square side; upscale False: at most that side.

    A JPEG is reduced while decoded (libjpeg's DCT scaling by 1/2, 1/4, 1/8, never below `side`), so a 12 MP photo
    costs about what a small one does. Any failure is a one-line DataError naming the file, including an image over
    Pillow's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS). Pillow's warning for images between 1x and
    2x that limit is silenced by decode_folder (they decode normally); where it is an error it is a DataError too.
    """
    with _decoding(path), Image.open(path) as image:
        own = native_side(image.size, policy)
        return _decode_open(image, own if side is None or (not upscale and side > own) else side, policy)


def _decode_open(image: Image.Image, side: int, policy: str) -> np.ndarray:
    if min(image.size) >= 2 * side:
        image.draft("RGB", (side, side))  # JPEG only (a no-op for other formats): decode at 1/2, 1/4 or 1/8
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:  # a phone photo taken sideways: upright, as viewers show it
        image = ImageOps.exif_transpose(image)
    return np.asarray(fit_to_square(_to_8bit(image).convert("RGB"), side, policy), dtype=np.uint8)


@contextlib.contextmanager
def _decoding(path):
    try:
        yield
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        raise DataError(f"cannot decode image {path}: {_one_line(error)}") from None


def native_side(size: tuple[int, int], policy: str) -> int:
    """The side of an image's square under `policy` without resizing: its shorter side, or its longer for pad."""
    return max(size) if policy == "pad" else min(size)


def fit_to_square(image: Image.Image, side: int, policy: str) -> Image.Image:
    """The one definition of how an image becomes the square the model sees (training, evaluate and predict):

    crop: centre square of the shorter side, resized to `side` (the default); squash: the whole image resized to
    side x side (aspect ratio lost); pad: the whole image scaled so its longer side is `side`, centred on a black
    square (letterbox). Resizing is bilinear (antialiased by Pillow when shrinking).
    """
    width, height = image.size
    if policy == "squash":
        return image if image.size == (side, side) else image.resize((side, side), Image.BILINEAR)
    if policy == "pad":
        scale = side / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        if inner != image.size:
            image = image.resize(inner, Image.BILINEAR)
        if inner == (side, side):
            return image
        square = Image.new(image.mode, (side, side))
        square.paste(image, ((side - inner[0]) // 2, (side - inner[1]) // 2))
        return square
    if policy != "crop":
        raise ValueError(f"unknown resize policy {policy!r} (expected {', '.join(RESIZE_POLICIES)})")
    short = min(width, height)
    left, top = (width - short) // 2, (height - short) // 2
    if image.size != (short, short):
        image = image.crop((left, top, left + short, top + short))
    return image if short == side else image.resize((side, side), Image.BILINEAR)


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
        entries = _image_entries(root / name)
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


def decode_cache_key(kind: str, fingerprint: str, **settings) -> str:
    """The decode cache key: the source's fingerprint and every other input that changes the decoded arrays
    (the cache format, and settings such as the storage size, the resize policy, skip_bad and the decoder's version)."""
    text = json.dumps({"format": CACHE_FORMAT, "source": fingerprint, **settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def decode_folder(
    root: Path,
    files,
    classes,
    *,
    storage_size: int | None,
    skip_bad: bool,
    progress: bool,
    policy: str = "crop",
    out: Path | None = None,
    side: int | None = None,
):
    """Decode every file to one square side -> (images (N, side, side, 3) uint8, labels, number skipped).

    With `side`, every image is stored at exactly that side (evaluate and predict repeat a run's storage this way).
    Otherwise the side is the images' own square side (native_side; the median where sizes differ, then at most
    MAX_MIXED_SIDE) capped at `storage_size`: images are reduced to it, never enlarged, unless the folder mixes
    sizes and they must share one. Each image is decoded reduced (decode_image) and written straight into its row
    of a memory-mapped .npy at `out` (in memory without `out`), so memory does not grow with the folder. The side
    is taken from the first image and each file is opened once; only where sizes turn out to differ are the
    images whose side was not the first one's decoded again. Threads: Pillow releases the GIL while decoding.
    """
    from .progress import track

    bad: dict[int, str] = {}
    own: dict[int, int] = {}  # file index -> its own square side

    def fail(i: int, error: DataError) -> None:
        if not skip_bad:
            raise error
        bad[i] = str(error)

    def target(i: int) -> int:
        if side is not None:
            return side
        return min(storage_size, own[i]) if storage_size else own[i]

    def first_side() -> int:
        if side is not None:
            return side
        for i, (path, _) in enumerate(files):
            with contextlib.suppress(DataError), _decoding(path), Image.open(path) as image:
                own[i] = native_side(image.size, policy)
                return target(i)
        raise DataError(f"no readable images in {root}")

    def allocate(at: int) -> np.ndarray:
        shape = (len(files), at, at, 3)
        if out is None or not room_for_cache(out, math.prod(shape)):
            return np.zeros(shape, dtype=np.uint8)
        return np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=shape)

    def decode(indices, at: int, images: np.ndarray, everything: bool, what: str) -> None:
        def load(i: int) -> None:
            path = files[i][0]
            try:
                with _decoding(path), Image.open(path) as image:
                    own[i] = native_side(image.size, policy)
                    if everything or target(i) == at:
                        images[i] = _decode_open(image, at, policy)
            except DataError as error:
                fail(i, error)

        for _ in track(pool.map(load, indices), total=len(indices), description=what, enabled=progress):
            pass

    # Images between 1x and 2x Pillow's bomb limit decode normally; without this each size warns once per run.
    # (Filters are process-wide, so they are set here, around the threads, not in decode_image.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            first = first_side()
            images = allocate(first)
            decode(range(len(files)), first, images, False, f"decoding {root.name}")
            sides = [own[i] for i in range(len(files)) if i in own and i not in bad]
            if not sides:
                raise DataError(f"no readable images in {root}")
            mixed = len(set(sides)) > 1
            cap = storage_size or (MAX_MIXED_SIDE if mixed else None)
            final = int(np.median(sides)) if mixed else sides[0]
            final = min(final, cap) if cap else final
            final = side if side is not None else final
            rest = [i for i in range(len(files)) if i not in bad and (final != first or target(i) != first)]
            if rest:  # mixed sizes: the images not decoded at the common side yet
                if final != first:
                    del images
                    images = allocate(final)
                decode(rest, final, images, True, f"decoding {root.name} (mixed sizes, to {final} px)")
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s), first: {bad[min(bad)]}", stacklevel=2)
        if len(bad) == len(files):
            raise DataError(f"no readable images in {root}")
        keep = np.ones(len(files), dtype=bool)
        keep[list(bad)] = False
        images, labels = _compact(images, keep, out), labels[keep]
    if isinstance(images, np.memmap):
        images.flush()
    return images, labels, len(bad)


def room_for_cache(path: Path, size: int) -> bool:
    """Whether the disk holding `path` has room for a cache file of `size` bytes; if not, one warning naming the path
    and the space needed (the images are then kept in memory). A memory map on a disk without room would end the
    process with SIGBUS when a page cannot be written: its size is checked before it is made."""
    free = free_bytes(path.parent)
    if free >= size + SPACE_MARGIN:
        return True
    warnings.warn(
        f"no space for the decode cache {path.parent}: it needs {size / 2**20:,.1f} MB, {free / 2**20:,.1f} MB free; "
        "the images are decoded in memory and decoded again next time",
        stacklevel=4,
    )
    return False


def _compact(images: np.ndarray, keep: np.ndarray, out: Path | None) -> np.ndarray:
    """The kept rows, copied a chunk at a time into a new file of the right length that replaces `out`."""
    rows = np.flatnonzero(keep)
    if out is None or not isinstance(images, np.memmap) or not room_for_cache(out, len(rows) * images[0].nbytes):
        return images[rows]
    part = out.with_name(f"compact-{out.name}")
    kept = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(len(rows), *images.shape[1:]))
    step = max(1, CHUNK_BYTES // max(1, images[0].nbytes))
    for start in range(0, len(rows), step):
        kept[start : start + step] = images[rows[start : start + step]]
    kept.flush()
    os.replace(part, out)
    return kept


# ------------------------------------------------------------------------------ disk cache
def _checksum(folder: Path) -> str:
    """sha256 of images.npy and labels.npy (headers included: dtype and shape), streamed with plain reads so a
    large cache is never made resident (about 0.15 s for CIFAR-10's 150 MB)."""
    digest, buffer = hashlib.sha256(), bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    for name in ("images.npy", "labels.npy"):
        with open(folder / name, "rb", buffering=0) as handle:
            while size := handle.readinto(buffer):
                digest.update(view[:size])
    return digest.hexdigest()


_DAMAGED = (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError)  # what reading a bad cache raises


def _cache_read(folder: Path):
    """(images, labels, meta) of a cache folder, images memory-mapped copy-on-write (writable in memory, the file
    untouched); OSError or ValueError when it is damaged."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("sha256") != _checksum(folder):
        raise ValueError("its arrays do not match the checksum in meta.json")
    images = np.load(folder / "images.npy", mmap_mode="c")
    labels = np.load(folder / "labels.npy")
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


def _cache_begin(folder: Path) -> Path | None:
    """A private temporary folder beside `folder` for a new copy, or None (with a warning) when none can be made."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder.parent)
        tmp.mkdir()
        return tmp
    except OSError as error:
        warnings.warn(f"cannot write the decode cache {folder}: {_one_line(error)}", stacklevel=4)
        return None


def _cache_commit(folder: Path, tmp: Path, labels, meta) -> bool:
    """`tmp` holds images.npy: add labels and meta (with the checksum), then rename it into place. True when
    `folder` then holds a valid copy.

    A valid cache already there is kept (another process wrote the same content), never deleted; a damaged one is
    renamed aside and deleted only once the new copy is in place. A killed writer leaves at most *.tmp-* / *.old-*
    folders, which no reader opens and a later save removes once they are STALE_SECONDS old. A cache that cannot be
    written is a warning: the decoded arrays are at hand and the run goes on.
    """
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    try:
        np.save(tmp / "labels.npy", labels)
        (tmp / "meta.json").write_text(json.dumps({**meta, "sha256": _checksum(tmp)}))
        if folder.exists():
            try:
                _cache_read(folder)
                return True  # valid: another process wrote the same content
            except _DAMAGED:
                with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
                    os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.exists():
                raise
            # else another process put its copy in place meanwhile: as good as ours
        return True
    except OSError as error:
        warnings.warn(f"cannot write the decode cache {folder}: {_one_line(error)}", stacklevel=4)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _cache_save(folder: Path, images, labels, meta) -> None:
    """Write arrays held in memory as a cache folder (see _cache_commit)."""
    tmp = _cache_begin(folder)
    if tmp is None:
        return
    try:
        np.save(tmp / "images.npy", images)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"cannot write the decode cache {folder}: {_one_line(error)}", stacklevel=3)
        return
    _cache_commit(folder, tmp, labels, meta)


def _remove_stale(parent: Path) -> None:
    cutoff = time.time() - STALE_SECONDS
    for path in [*parent.glob("*.tmp*"), *parent.glob("*.old-*")]:
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


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

    images, labels, meta = _decode_cached(cache_dir / "decoded" / key, root, source.files, classes, check,
                                          storage_size=storage_size, policy=policy, skip_bad=skip_bad,
                                          progress=progress, side=side)  # fmt: skip
    return ImageSet(images, labels, meta["classes"], key, skipped=meta["skipped"], storage_size=storage_size,
                    resize_policy=policy, duplicates=source.duplicates)  # fmt: skip


def _decode_cached(folder: Path, root: Path, files, classes, check, *, storage_size, policy, skip_bad, progress,
                   side=None):  # fmt: skip
    """(images, labels, meta) from the cache `folder`, else decoded (decode_folder, straight into a new cache copy)
    and committed. `check(labels)` validates what was decoded and returns the meta to store."""
    cached = _cache_load(folder)
    if cached is not None:
        return cached
    tmp = _cache_begin(folder)
    try:
        images, labels, skipped = decode_folder(root, files, classes, storage_size=storage_size, skip_bad=skip_bad,
                                                progress=progress, policy=policy, side=side,
                                                out=None if tmp is None else tmp / "images.npy")  # fmt: skip
        meta = {**check(labels), "skipped": skipped}
        # in memory (the disk had no room for the cache, already said): nothing to commit
        if isinstance(images, np.memmap) and _cache_commit(folder, tmp, labels, meta):
            images = np.load(folder / "images.npy", mmap_mode="c")  # just written and checked: no second checksum
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return images, labels, meta


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


def check_given_split(parts: np.ndarray, where: str, column: str | None) -> None:
    for code, name in enumerate(SPLIT_PARTS[:2]):
        if not (parts == code).any():
            raise DataError(f"{where}: no row of its {column or 'split'} column is {name!r} (train and val need rows)")


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
    images, kept, meta = _decode_cached(cache_dir / "decoded" / key, path, files, classes, check,
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
            from torchvision.datasets import CIFAR10

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
    cached = _cache_load(cache_dir / "decoded" / key)
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
        _cache_save(cache_dir / "decoded" / key, images, labels, {"classes": classes, "n_train": len(train_y)})
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


def storage_size_for(config) -> int:
    """The side a run's images are stored at, at most: --storage-size, else what its centre crop of --resolution
    needs (timm's 224 px at crop_pct 0.875: 256)."""
    config = config.resolved()
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
