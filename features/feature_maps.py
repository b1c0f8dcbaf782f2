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


def window_means_graph(maps, windows, stride: int):
    """In-graph :func:`pool_windows` for a batch: ``maps`` ``(b, h, w, C)``, ``windows``
    ``(b, k, 3)`` int rows ``(y, x, side)`` -> ``(b, k, C)`` float32 window means.

    Runs inside the extractor's compiled graph, so on a GPU the maps never leave the device.
    The cell ranges are :func:`window_cells`' (``tf.round`` rounds half to even, as Python's
    ``round``) and the summed-area table is float64 as in :func:`pool_windows`: the means equal
    its output to the last float32 bit on CPU (a test checks to 1e-6 relative).
    """
    import tensorflow as tf

    h, w = tf.shape(maps)[1], tf.shape(maps)[2]
    win = tf.cast(windows, tf.float64)
    span = tf.maximum(1, tf.cast(tf.round(win[..., 2] / stride), tf.int32))
    r0 = tf.minimum(tf.maximum(0, tf.cast(tf.round(win[..., 0] / stride), tf.int32)),
                    tf.maximum(0, h - span))
    c0 = tf.minimum(tf.maximum(0, tf.cast(tf.round(win[..., 1] / stride), tf.int32)),
                    tf.maximum(0, w - span))
    r1, c1 = tf.minimum(h, r0 + span), tf.minimum(w, c0 + span)
    table = tf.cumsum(tf.cumsum(tf.cast(maps, tf.float64), axis=1), axis=2)
    table = tf.pad(table, [[0, 0], [1, 0], [1, 0], [0, 0]])

    def at(r, c):
        return tf.gather_nd(table, tf.stack([r, c], axis=-1), batch_dims=1)

    total = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    area = tf.cast((r1 - r0) * (c1 - c0), tf.float64)[..., None]
    return tf.cast(total / area, tf.float32)


def cell_edges(n_cells: int, size: int) -> list[int]:
    """Boundaries of ``n_cells`` near-equal cells over ``size`` map cells (``size >= n_cells``)."""
    return [int(round(i * size / n_cells)) for i in range(n_cells + 1)]


def cell_means(maps: np.ndarray, instances: str) -> np.ndarray:
    """:func:`cell_means_graph` on the host (engines that return their maps): ``(b, h, w, C)``
    -> ``(b, rows * cols, C)`` float32, means computed in float64."""
    from features.pooling import grid_shape

    maps = np.asarray(maps)
    h, w = maps.shape[1:3]
    rows, cols = grid_shape(instances, h, w)
    if h < rows or w < cols:
        raise ValueError(f"a {w}x{h} feature map has fewer cells than the {cols}x{rows} grid of {instances!r}")
    ys, xs = cell_edges(rows, h), cell_edges(cols, w)
    return np.stack([maps[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]].mean(axis=(1, 2), dtype=np.float64)
                     for r in range(rows) for c in range(cols)], axis=1).astype(np.float32)


def cell_means_graph(maps, instances: str):
    """In-graph means of ``maps`` ``(b, h, w, C)`` over the cell grid of ``instances``
    (``"cells-AxB"``, :func:`features.pooling.grid_shape`) -> ``(b, rows * cols, C)`` float32,
    cells in row-major order, computed in float64 like the whole-map mean.

    The map's height and width must be static (the extractor compiles one graph per image
    shape) and at least the grid's (``features.image_side`` skips smaller images).
    """
    import tensorflow as tf

    from features.pooling import grid_shape

    h, w = maps.shape[1], maps.shape[2]
    if h is None or w is None:
        raise ValueError("cell_means_graph needs a map of static height and width")
    rows, cols = grid_shape(instances, h, w)
    if h < rows or w < cols:
        raise ValueError(f"a {w}x{h} feature map has fewer cells than the {cols}x{rows} grid of {instances!r}")
    x = tf.cast(maps, tf.float64)
    ys, xs = cell_edges(rows, h), cell_edges(cols, w)
    cells = [tf.reduce_mean(x[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]], axis=[1, 2])
             for r in range(rows) for c in range(cols)]
    return tf.cast(tf.stack(cells, axis=1), tf.float32)
