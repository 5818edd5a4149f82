"""How a file becomes a stored uint8 square: decoding (bounded, EXIF-upright, 8-bit), one resize policy, and the
threaded decode of a whole folder into one array (memory-mapped when there is room)."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from ..errors import one_line as _one_line
from ..fsutil import SPACE_MARGIN, free_bytes, replaced_on_success
from ..progress import track
from .imageset import CHUNK_BYTES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ORIENTATION_TAG = 0x0112  # EXIF: how the camera was held
MAX_MIXED_SIDE = 256  # with no storage size, mixed-size folders are stored at most this large
RESIZE_POLICIES = ("crop", "squash", "pad")


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
    with replaced_on_success(out) as part:  # the mapping stays valid when its file is renamed
        kept = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(len(rows), *images.shape[1:]))
        step = max(1, CHUNK_BYTES // max(1, images[0].nbytes))
        for start in range(0, len(rows), step):
            kept[start : start + step] = images[rows[start : start + step]]
        kept.flush()
    return kept


# ------------------------------------------------------------------------------ thumbnails kept in records
def png_base64(array: np.ndarray) -> str:
    """(H, W, 3) or (H, W) uint8 -> base64 of a PNG (analysis's thumbnails, as the study records them)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(text: str) -> np.ndarray:
    """png_base64's text -> the uint8 array again."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))
