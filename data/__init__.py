"""Image I/O, labels, dataset discovery and synthetic data.

Submodules
----------
io
    :func:`read_image` (any JPEG/PNG/TIFF -> ``(H, W, 3)`` uint8 RGB),
    :func:`write_image`, :class:`ImageReadError`, :data:`IMAGE_EXTENSIONS`.
labels
    Label schemes (:data:`SCHEMES`), :func:`canonical_label`,
    :func:`map_labels`, :func:`class_names`, :func:`encode`, :func:`decode`.
datasets
    :func:`load_dataset` (class folders or CSV manifest -> DataFrame),
    :class:`DatasetError`.
synthetic
    :func:`make_image` and :func:`write_dataset` for H&E-like test images.
"""

from .datasets import DatasetError, load_dataset
from .io import IMAGE_EXTENSIONS, ImageReadError, is_image_file, list_images, read_image, write_image
from .labels import (
    CANONICAL_LABELS,
    SCHEMES,
    canonical_label,
    class_names,
    decode,
    encode,
    map_labels,
    supported_schemes,
)
from .synthetic import make_image, write_dataset

__all__ = [
    "CANONICAL_LABELS",
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "SCHEMES",
    "canonical_label",
    "class_names",
    "decode",
    "encode",
    "is_image_file",
    "list_images",
    "load_dataset",
    "make_image",
    "map_labels",
    "read_image",
    "supported_schemes",
    "write_dataset",
    "write_image",
]
