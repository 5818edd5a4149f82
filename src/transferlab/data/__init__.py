"""Data: image sources (folders, labels files, CIFAR-10) decoded once into uint8 arrays, cached, and split."""

from ..errors import DataError
from .decode import IMAGE_EXTENSIONS, RESIZE_POLICIES, decode_image, fit_to_square
from .imageset import SPLIT_PARTS, ImageSet
from .sources import (
    load_cifar10,
    load_image_folder,
    load_images,
    load_labels_file,
    read_labels_file,
    scan_image_folder,
    storage_size_for,
)
from .split import Split, class_counts, make_split, split_arrays, split_for

__all__ = [
    "IMAGE_EXTENSIONS", "RESIZE_POLICIES", "SPLIT_PARTS", "DataError", "ImageSet", "Split", "class_counts",
    "decode_image", "fit_to_square", "load_cifar10", "load_image_folder", "load_images", "load_labels_file",
    "make_split", "read_labels_file", "scan_image_folder", "split_arrays", "split_for", "storage_size_for",
]  # fmt: skip
