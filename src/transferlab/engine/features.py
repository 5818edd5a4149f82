"""The frozen-prefix activation cache.

When the first groups of a network are frozen and nothing random happens to the input before
them, their output for an image never changes: compute it once, keep it (fp16), and train only
the rest. Keyed by everything the activations depend on; held in memory for the trials of one
process and spilled to disk for the next process.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config.identity import fingerprint
from ..errors import OutputError, one_line
from ..fsutil import replaced_on_success, require_space
from ..progress import bar
from .forward import prefix_output
from .preprocess import Preprocess

FEATURE_CACHE_FORMAT = 2


def feature_key(
    *,
    data: str,
    rows: np.ndarray,
    arch: str,
    weights: str,
    cut: int,
    preprocess: Preprocess,
    mirror: bool,
    autocast: bool,
    device: torch.device,
) -> str:
    """The one key of cached activations, built from everything they depend on: the decoded images (`data`, the
    decode cache's key) and which of them (`rows`), the network up to the cut (architecture, weights identity from
    `models.weights_identity`, with the seed for random initialisation), the input transform, mirroring,
    precision, the device type, the torch version, and this cache's format."""
    parts = {
        "format": FEATURE_CACHE_FORMAT,
        "torch": torch.__version__,
        "device": device.type,
        "data": data,
        "rows": hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest(),
        "arch": arch,
        "weights": weights,
        "cut": cut,
        "preprocess": preprocess.identity(),
        "mirror": mirror,
        "autocast": autocast,
    }
    return fingerprint(parts, length=32)


class FeatureCache:
    """Memory (LRU within a byte budget) in front of a folder of .npy files."""

    def __init__(self, folder: Path | None, memory_budget: int = 8 << 30):
        self.folder = folder
        self.memory_budget = memory_budget
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.exists():
            try:
                array = np.load(path)
                intact = path.with_suffix(".sha256").read_text().strip() == _digest(array)
            except (OSError, ValueError):
                intact = False
            if not intact:  # damaged on disk: recompute rather than train on wrong activations
                warnings.warn(f"feature cache {path} is damaged; computing it again", stacklevel=2)
                return None
            tensor = torch.from_numpy(array)
            self._remember(key, tensor)
            self.hits += 1
            return tensor
        return None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Keep the activations in memory and on disk. A disk without room is one warning naming the folder and the
        space needed (the activations stay in memory for this process; the next computes them again), and leaves no
        temporary file."""
        self.misses += 1
        self._remember(key, tensor)
        path = self._path(key)
        if path is None:
            return
        array = tensor.cpu().numpy()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            require_space(path, array.nbytes + 256, "the feature cache")
            # the checksum is in place before the array: a reader never pairs a new array with an old checksum
            with replaced_on_success(path) as tmp, replaced_on_success(path.with_suffix(".sha256")) as checksum:
                with open(tmp, "wb") as handle:
                    np.save(handle, array)
                checksum.write_text(_digest(array))
        except (OSError, OutputError) as error:
            warnings.warn(f"{one_line(error)}; the frozen features are kept in memory only", stacklevel=2)

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.npy"

    def _remember(self, key: str, tensor: torch.Tensor) -> None:
        self._memory[key] = tensor
        while (
            len(self._memory) > 1
            and sum(t.numel() * t.element_size() for t in self._memory.values()) > self.memory_budget
        ):
            self._memory.popitem(last=False)


def _digest(array: np.ndarray) -> str:
    digest = hashlib.sha256(f"{array.dtype}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


@torch.no_grad()
def compute_features(
    prefix: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    *,
    batch_size: int,
    device: torch.device,
    mirror: bool = False,
    dtype=torch.float16,
    progress: bool = True,
    autocast: bool = False,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefix output for every image (uint8 NHWC on any device), or for `rows` of them (indices on the images'
    device; each chunk is gathered on its own, so a memory-mapped set is never copied whole) -> `dtype` on `device`."""
    prefix.eval()
    out = None
    count = len(images) if rows is None else len(rows)
    with bar(count, "caching frozen features" + (" (mirrored)" if mirror else ""), unit="img", enabled=progress) as b:
        for start in range(0, count, batch_size):
            chunk = images[start : start + batch_size] if rows is None else images[rows[start : start + batch_size]]
            x = preprocess(chunk.to(device, non_blocking=True), mirror=mirror)
            y = prefix_output(prefix, x, autocast=autocast, feature_dtype=None)  # stored below at `dtype`
            if out is None:  # filled in place: a torch.cat of chunks would need twice the memory at the end
                out = torch.empty((count, *y.shape[1:]), dtype=dtype, device=device)
            out[start : start + len(y)] = y
            b.advance(len(x))
    return out
