"""A data set as three arrays: images (N, H, W, 3) uint8, labels (N,) int64, class names, with what it came from.

Everything after the data package works on those arrays; no file is opened on the training path."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

CHUNK_BYTES = 16 << 20  # streamed checksums read files this much at a time
SPLIT_PARTS = ("train", "val", "test")


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
