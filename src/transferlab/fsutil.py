"""Files written safely: atomic writes that fail in one line on a full disk, folder locks, outputs that are inputs.

Every file a run or a study writes goes through `atomic_write_bytes` (or its JSON and torch.save forms): the bytes
are made in memory, the free space is checked, a temporary file beside the target is written and renamed over it.
A reader never sees half a file, a full disk is one OutputError naming the path and the space needed, and no
temporary file is left behind. Files another library writes itself (numpy's .npy, the ONNX and TorchScript exporters)
go through `replaced_on_success`, the one place a temporary file is named and renamed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError, one_line

SPACE_MARGIN = 1 << 20  # bytes kept free beyond a write: a filesystem's own bookkeeping needs some


def free_bytes(path: str | Path) -> int:
    """Bytes free for an unprivileged writer on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 2**10:,.1f} KB"


def require_space(path: str | Path, needed: int, what: str) -> None:
    """An OutputError naming `path` and the space needed when its filesystem has less than `needed` bytes free."""
    free = free_bytes(Path(path).parent)
    if free < needed + SPACE_MARGIN:
        raise OutputError(f"no space left for {what} {path}: it needs {_size(needed)}, {_size(free)} free")


@contextlib.contextmanager
def replaced_on_success(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to (by any writer: ours, numpy's, an exporter's); it replaces `path`
    when the block ends without an error and is removed otherwise, so a reader never sees half a file and a failed
    or interrupted write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: str | Path, what: str = "file") -> None:
    """Write `data` to `path` all at once (a temporary file, then a rename), or raise a one-line OutputError."""
    path = Path(path)
    require_space(path, len(data), what)
    try:
        with replaced_on_success(path) as tmp, open(tmp, "wb") as handle:
            handle.write(data)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"no space left for {what} {path}: it needs {_size(len(data))}, {_size(free_bytes(path.parent))} free"
            ) from None
        raise OutputError(f"cannot write {what} {path}: {one_line(error)}") from None


def atomic_write_text(text: str, path: str | Path, what: str = "file") -> None:
    atomic_write_bytes(text.encode(), path, what)


def atomic_write_json(obj, path: str | Path, what: str = "file") -> None:
    atomic_write_text(json.dumps(obj, indent=1), path, what)


def atomic_save(obj, path: str | Path, what: str = "file") -> None:
    """torch.save, atomically (see atomic_write_bytes): a killed or starved run never leaves half a checkpoint."""
    import torch  # fsutil stays free of torch: --help and the report load it

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path, what)


def writable_folder(path: str | Path, what: str, error: type[Exception]) -> Path:
    """Create `path` if needed and check that files can be written in it, before any work depends on it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise error(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise error(f"{what} {path} is not writable ({exc.strerror or type(exc).__name__})") from None
    return path


# ------------------------------------------------------------------------------ locks
@contextlib.contextmanager
def exclusive(lock_file: Path):
    """One process at a time (waits for the others)."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def claimed(lock_file: Path) -> Iterator[bool]:
    """Yields whether this process holds `lock_file` (never waits). The lock ends with the process, however it ends."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ outputs that are inputs
def same_file(a: str | Path, b: str | Path) -> bool:
    """Do two paths name one file on disk (a link, another spelling)? False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_output_over_input(output: str | Path, inputs: Iterable[str | Path], flag: str, error: type[Exception]):
    """A one-line `error` when `output` is one of the `inputs` (writing it would destroy what is being read)."""
    for source in inputs:
        if same_file(output, source):
            raise error(f"{flag} {output} is an input ({source}): writing it would replace what is being read")


def checked_output_file(path: str | Path, flag: str, error: type[Exception]) -> Path:
    """The file an output option writes: `path`, or where its symlink points (the link stays a link). A folder, a
    device, pipe or socket (/dev/null: a rename would replace the device node) or a missing folder is refused in one
    line, before any work. (engine.rundir.output_file adds a run folder's own files.)"""
    given = Path(path).expanduser()
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    if target.is_dir():
        raise error(f"{flag} {given} is a folder: name a file")
    if target.exists() and not target.is_file():
        raise error(f"{flag} {given} is not a regular file (a device, pipe or socket): name a file, or leave "
                    f"{flag} out to write to the standard output where there is one")  # fmt: skip
    if not target.parent.is_dir():
        raise error(f"{flag} {given}: folder {target.parent} does not exist")
    return target


# ------------------------------------------------------------------------------ torch files
def read_torch_file(path: Path, what: str, error: type[Exception]) -> object:
    """torch.load(weights_only=True) with one-line errors: a missing, empty, foreign or truncated file is named
    as such (never PyTorch's advice to drop weights_only, which would run code from the file)."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise error(f"{what} {path} is empty (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip, or a pickle in the legacy format
        raise error(f"cannot read {what} {path}: not a file written by torch.save")
    import torch  # as above

    try:
        with warnings.catch_warnings():  # e.g. torch's note on a foreign pickle protocol: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign pickles: one message each
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects besides tensors, which are not loaded for safety"
        elif head == b"PK\x03\x04":
            reason = "the PyTorch file is truncated or damaged"
        else:
            reason = "not a file written by torch.save"
        raise error(f"cannot read {what} {path}: {reason}") from None
