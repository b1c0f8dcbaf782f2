"""Pooling crop windows out of one feature map of a whole image.

The backbones are convolutional and end in global average pooling, so the feature of a crop is
close to the average of the whole image's feature map over the cells under that crop.  One pass
over an augmented image then replaces one pass per crop (the 20 crops of a 1024x768 image
overlap heavily).  Borders differ: the crop's network sees zero padding at the crop's edge where
the whole-image network sees the neighbouring tissue; how close the two are is measured by the
benchmark, not assumed.
"""
from __future__ import annotations

import numpy as np


def window_cells(y: int, x: int, side: int, stride: int, map_h: int, map_w: int):
    """Feature-map cell range ``(r0, r1, c0, c1)`` under the window ``[y, y+side) x [x, x+side)``.

    A cell ``i`` covers input pixels ``[i*stride, (i+1)*stride)``; the window starts at the
    nearest cell boundary and spans ``round(side / stride)`` cells (at least one), clipped to
    the map.
    """
    n = max(1, int(round(side / stride)))
    r0 = min(max(0, int(round(y / stride))), max(0, map_h - n))
    c0 = min(max(0, int(round(x / stride))), max(0, map_w - n))
    return r0, min(map_h, r0 + n), c0, min(map_w, c0 + n)


def pool_windows(feature_map: np.ndarray, windows: np.ndarray, stride: int) -> np.ndarray:
    """Mean of ``feature_map`` (h, w, C) over each window ``(y, x, side)``; ``(n, C)`` float32.

    Uses a summed-area table so each window costs O(C) whatever its size (heatmaps pool
    thousands of windows).
    """
    fmap = np.asarray(feature_map, dtype=np.float64)
    h, w, c = fmap.shape
    integral = np.zeros((h + 1, w + 1, c))
    integral[1:, 1:] = fmap.cumsum(0).cumsum(1)
    out = np.empty((len(windows), c), dtype=np.float32)
    for i, (y, x, side) in enumerate(np.asarray(windows, dtype=np.int64)):
        r0, r1, c0, c1 = window_cells(y, x, side, stride, h, w)
        total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
        out[i] = total / ((r1 - r0) * (c1 - c0))
    return out
