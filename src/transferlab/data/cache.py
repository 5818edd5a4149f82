"""The decode cache: decoded arrays on disk, keyed by everything they depend on, verified by a checksum, written
so that a killed or starved writer never leaves a half cache in place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from ..config.identity import fingerprint
from ..errors import one_line as _one_line
from .decode import decode_folder
from .imageset import CHUNK_BYTES

CACHE_FORMAT = 3  # 3: square storage size and policy in the key, images.npy written and read memory-mapped
STALE_SECONDS = 3600  # a *.tmp-* / *.old-* cache folder this old belongs to a killed writer


def decode_cache_key(kind: str, source: str, **settings) -> str:
    """The decode cache key: the source's fingerprint and every other input that changes the decoded arrays
    (the cache format, and settings such as the storage size, the resize policy, skip_bad and the decoder's version)."""
    return f"{kind}-{fingerprint({'format': CACHE_FORMAT, 'source': source, **settings}, length=20)}"


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


def cache_load(folder: Path):
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


def cache_save(folder: Path, images, labels, meta) -> None:
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


def decode_cached(folder: Path, root: Path, files, classes, check, *, storage_size, policy, skip_bad, progress,
                   side=None):  # fmt: skip
    """(images, labels, meta) from the cache `folder`, else decoded (decode_folder, straight into a new cache copy)
    and committed. `check(labels)` validates what was decoded and returns the meta to store."""
    cached = cache_load(folder)
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
