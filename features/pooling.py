"""Pooling of the crop features of one augmented image into one vector, and the instances
(cells of the feature map) kept for multiple-instance classifiers."""
from __future__ import annotations

import re

import numpy as np

POOLINGS = ("mean", "max", "pnorm3")
#: ``--instances`` values: ``none``, or ``cells-AxB`` (A cells along the longer side, B along the
#: shorter one), e.g. ``cells-4x3``.
INSTANCE_CHOICES = ("none", "cells-AxB")


def parse_instances(text: str) -> tuple[int, int] | None:
    """``"none"`` -> ``None``; ``"cells-4x3"`` -> ``(4, 3)`` (cells along the longer, shorter side).

    The grid follows the image's orientation so that a portrait image's cells have the shape of
    a landscape one's; a bag of instances has no order, so nothing depends on which is which.
    """
    if text == "none":
        return None
    match = re.fullmatch(r"cells-(\d+)x(\d+)", str(text))
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"`instances` must be 'none' or 'cells-AxB' with A, B >= 1 (e.g. 'cells-4x3'), "
                         f"got {text!r}")
    return int(match[1]), int(match[2])


def grid_shape(instances: str, height: int, width: int) -> tuple[int, int]:
    """``(rows, cols)`` of the cell grid of ``instances`` on a ``height x width`` map."""
    long_side, short_side = parse_instances(instances)
    return (short_side, long_side) if width >= height else (long_side, short_side)


def mean_of_instances(instances: np.ndarray) -> np.ndarray:
    """``(..., n_instances, C)`` -> ``(..., C)`` float32, the mean computed in float64: the one
    vector per augmented image of an instance store, which every vector classifier reads."""
    x = np.asarray(instances, dtype=np.float64)
    if x.ndim < 2 or x.shape[-2] == 0:
        raise ValueError(f"expected (..., n_instances, n_features) with n_instances >= 1, got shape {x.shape}")
    return x.mean(axis=-2).astype(np.float32)


def pool_features(crop_features: np.ndarray, method: str) -> np.ndarray:
    """Pool ``(n_crops, n_features)`` into ``(n_features,)``.

    ``pnorm3`` is the generalised mean ``mean(|x|**3) ** (1/3)`` used by Rakhlin et al.: between
    mean and max pooling, it favours strong local responses without keeping only one crop.
    The backbones end in ReLU-family activations, so features are non-negative and the
    absolute value changes nothing for them.
    """
    x = np.asarray(crop_features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n_crops, n_features) array, got shape {x.shape}")
    if method == "mean":
        out = x.mean(axis=0)
    elif method == "max":
        out = x.max(axis=0)
    elif method == "pnorm3":
        out = np.cbrt(np.mean(np.abs(x) ** 3, axis=0))
    else:
        raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")
    return out.astype(np.float32)


def pool_features_graph(crop_features, method: str):
    """In-graph :func:`pool_features` over axis 1: ``(b, n_crops, C)`` -> ``(b, C)`` float32.

    Computed in float64 as :func:`pool_features`; the results agree to the last float32 bit
    but for rounding ties (``pnorm3`` uses ``pow(., 1/3)``: TensorFlow has no cube root).
    """
    import tensorflow as tf

    if method not in POOLINGS:
        raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")
    x = tf.cast(crop_features, tf.float64)
    if method == "mean":
        out = tf.reduce_mean(x, axis=1)
    elif method == "max":
        out = tf.reduce_max(x, axis=1)
    else:
        out = tf.pow(tf.reduce_mean(tf.abs(x) ** 3, axis=1), 1.0 / 3.0)
    return tf.cast(out, tf.float32)
