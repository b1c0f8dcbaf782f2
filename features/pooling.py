"""Pooling of the crop features of one augmented image into one vector."""
from __future__ import annotations

import numpy as np

POOLINGS = ("mean", "max", "pnorm3")


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
