"""Image I/O, labels, dataset discovery and synthetic data.

Submodules
----------
io
    :func:`read_image` (any JPEG/PNG/TIFF -> ``(H, W, 3)`` uint8 RGB),
    :func:`write_image`, :class:`ImageReadError`, :data:`IMAGE_EXTENSIONS`.
labels
    Label schemes (:data:`SCHEMES`), :func:`canonical_label`,
    :func:`map_labels`, :func:`class_names`, :func:`encode`, :func:`decode`.
    Also :func:`normalise_label`, :func:`class_order`, :func:`check_class_names` for any
    class names.
mapping
    :class:`LabelScheme`, :func:`resolve_scheme` (``--labels``: auto, classes, built-in,
    mapping file), :func:`load_mapping`, :func:`groupings`.
breakhis
    :func:`parse_name` of BreakHis file names (subtype, patient, magnification).
duplicates
    :func:`group_duplicates`: copies of one image (same bytes) kept in one group.
datasets
    :func:`load_dataset` (class folders, CSV manifest, BreakHis, BACH's official
    layout -> DataFrame), :class:`DatasetError`.
synthetic
    :func:`make_image` and :func:`write_dataset` for H&E-like test images.
"""

from .breakhis import parse_name as parse_breakhis_name
from .datasets import DatasetError, load_dataset, select_magnification
from .io import IMAGE_EXTENSIONS, ImageReadError, is_image_file, list_images, read_image, write_image
from .labels import (
    CANONICAL_LABELS,
    SCHEMES,
    canonical_label,
    check_class_names,
    class_names,
    class_order,
    decode,
    encode,
    map_labels,
    normalise_label,
    supported_schemes,
)
from .mapping import LabelScheme, MappingError, groupings, load_mapping, resolve_scheme
from .synthetic import make_image, write_breakhis, write_dataset

__all__ = [
    "CANONICAL_LABELS",
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "LabelScheme",
    "MappingError",
    "SCHEMES",
    "canonical_label",
    "check_class_names",
    "class_names",
    "class_order",
    "decode",
    "encode",
    "is_image_file",
    "list_images",
    "groupings",
    "load_dataset",
    "load_mapping",
    "make_image",
    "map_labels",
    "normalise_label",
    "parse_breakhis_name",
    "read_image",
    "resolve_scheme",
    "select_magnification",
    "supported_schemes",
    "write_breakhis",
    "write_dataset",
    "write_image",
]
