"""Patch grids and the eight rotations/flips of square patches and of patch grids.

Grid geometry (Nazeri et al. 2018, section 3.1)
-----------------------------------------------
Patches of ``k x k`` pixels taken with stride ``s`` over an ``H x W`` image form a grid of
``rows = 1 + (H - k) // s`` by ``cols = 1 + (W - k) // s`` patches (35 = 5 x 7 for a 2048 x 1536
image with ``k = 512, s = 256``; 12 = 3 x 4 with ``s = 512``).  The grid is *centred*: when
``(H - k)`` is not a multiple of ``s`` the uncovered margin is split between both sides
(the top/left side gets the smaller half), so flipping an image moves no patch by more than a
pixel and neither border is systematically ignored.  An image smaller than one patch in
either dimension has no grid: :func:`grid_shape` raises.

Dihedral transforms
-------------------
The eight symmetries of the square are numbered ``0 .. 7``: ``index = 4 * flip + quarter``,
i.e. an optional left-right mirror followed by ``quarter`` counter-clockwise quarter turns
(``numpy.rot90``).  They are exact pixel permutations (no interpolation, no cropping for
square patches).  Indices with an odd ``quarter`` swap height and width.

Grids of patches (arrays shaped ``(rows, cols, h, w, ...)``) are transformed as the image
they tile would be: the same transform is applied to the grid axes *and* to the pixel axes
of every patch (:func:`dihedral_grid`), so for non-overlapping patches
``dihedral_grid(extract_patches(x), t) == extract_patches(dihedral(x, t))`` exactly.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DIHEDRAL_NAMES",
    "N_DIHEDRAL",
    "dihedral",
    "dihedral_grid",
    "extract_patches",
    "grid_shape",
    "inverse_dihedral",
    "orient_grid",
    "patch_positions",
    "stack_maps",
    "swaps_axes",
    "transpose_grid",
]

#: Number of dihedral transforms of the square.
N_DIHEDRAL = 8

#: Human-readable name of each transform index.
DIHEDRAL_NAMES: tuple[str, ...] = (
    "identity", "rot90", "rot180", "rot270", "flip_lr", "transpose", "flip_ud", "anti_transpose",
)


def grid_shape(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Number of patch rows and columns, ``(1 + (H - k) // s, 1 + (W - k) // s)``.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    patch_size : int
        Patch side ``k``.
    stride : int
        Step ``s`` between patches (``s = k``: non-overlapping).

    Returns
    -------
    tuple of int
        ``(rows, cols)``.

    Raises
    ------
    ValueError
        If the image is smaller than one patch, or `patch_size` / `stride` are not positive.
    """
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be >= 1, got {patch_size} and {stride}")
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"image of {height}x{width} pixels (height x width) is smaller than one "
            f"{patch_size}x{patch_size} patch"
        )
    return 1 + (height - patch_size) // stride, 1 + (width - patch_size) // stride


def patch_positions(height: int, width: int, patch_size: int, stride: int) -> np.ndarray:
    """Top-left corners ``(y, x)`` of the centred patch grid, in row-major order.

    Parameters
    ----------
    height, width, patch_size, stride : int
        As in :func:`grid_shape`.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of shape ``(rows * cols, 2)``; patch ``r * cols + c`` is at
        ``(y0 + r * stride, x0 + c * stride)`` with the centring offsets ``y0, x0``.
    """
    rows, cols = grid_shape(height, width, patch_size, stride)
    y0 = (height - (patch_size + (rows - 1) * stride)) // 2
    x0 = (width - (patch_size + (cols - 1) * stride)) // 2
    ys, xs = np.meshgrid(y0 + stride * np.arange(rows), x0 + stride * np.arange(cols), indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int64)


def extract_patches(image: np.ndarray, patch_size: int, stride: int) -> np.ndarray:
    """Cut an image into its patch grid.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, ...)`` array.
    patch_size, stride : int
        As in :func:`grid_shape`.

    Returns
    -------
    numpy.ndarray
        ``(rows, cols, k, k, ...)`` array (a copy) of the same dtype.
    """
    height, width = image.shape[:2]
    rows, cols = grid_shape(height, width, patch_size, stride)
    corners = patch_positions(height, width, patch_size, stride)
    patches = np.stack([image[y:y + patch_size, x:x + patch_size] for y, x in corners])
    return patches.reshape((rows, cols) + patches.shape[1:])


def _check_index(index: int) -> tuple[int, bool]:
    if not 0 <= int(index) < N_DIHEDRAL:
        raise ValueError(f"dihedral transform index must be in 0..7, got {index}")
    return int(index) % 4, int(index) >= 4


def dihedral(array: np.ndarray, index: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Apply dihedral transform `index` (see module docstring) over two axes.

    Parameters
    ----------
    array : numpy.ndarray
        Any array, e.g. an ``(H, W, 3)`` image or a batch ``(N, k, k, 3)`` with ``axes=(1, 2)``.
    index : int
        ``0 .. 7``: ``4 * flip + quarter_turns``.
    axes : tuple of int
        The (row, column) axes.

    Returns
    -------
    numpy.ndarray
        A view where possible (no copy, no interpolation).
    """
    quarter, flip = _check_index(index)
    if flip:
        array = np.flip(array, axis=axes[1])
    return np.rot90(array, quarter, axes=axes)


def inverse_dihedral(index: int) -> int:
    """Index of the transform undoing `index` (mirrors are their own inverse)."""
    quarter, flip = _check_index(index)
    return index if flip else (4 - quarter) % 4


def swaps_axes(index: int) -> bool:
    """Whether transform `index` exchanges height and width (odd number of quarter turns)."""
    quarter, _ = _check_index(index)
    return quarter % 2 == 1


def dihedral_grid(grid: np.ndarray, index: int) -> np.ndarray:
    """Transform a ``(rows, cols, h, w, ...)`` grid as the image it tiles would be.

    The transform is applied both to the grid positions (axes 0, 1) and to the pixels of every
    patch (axes 2, 3); patches must be square for odd quarter turns to keep their shape.
    """
    return dihedral(dihedral(grid, index, axes=(0, 1)), index, axes=(2, 3))


def transpose_grid(grid: np.ndarray) -> np.ndarray:
    """Transpose a ``(rows, cols, h, w, ...)`` grid as an image: positions and pixels."""
    order = (1, 0, 3, 2) + tuple(range(4, grid.ndim))
    return grid.transpose(order)


def orient_grid(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bring a grid to ``shape = (rows, cols)``, transposing it when it is the other way round.

    This is how a rotated non-square image is fed to a network trained on one grid
    orientation: a ``4 x 3`` grid becomes ``3 x 4`` by the image transpose, which also turns
    every patch (map) by the same symmetry, so neighbouring patches stay neighbours.

    Raises
    ------
    ValueError
        If the grid has neither ``shape`` nor its transpose.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if grid.shape[:2] == (rows, cols):
        return grid
    if grid.shape[:2] == (cols, rows):
        return transpose_grid(grid)
    raise ValueError(f"a {grid.shape[0]}x{grid.shape[1]} patch grid cannot be oriented to {rows}x{cols}")


def stack_maps(grid: np.ndarray) -> np.ndarray:
    """Stack a ``(rows, cols, h, w, c)`` grid of maps on channels: ``(h, w, rows * cols * c)``.

    Channel ``(r * cols + j) * c + i`` is channel ``i`` of the patch at row ``r``, column ``j``
    (patches in row-major order, as in Nazeri et al.'s ``12 C x 64 x 64`` input).
    """
    rows, cols, h, w, c = grid.shape
    return np.ascontiguousarray(grid.transpose(2, 3, 0, 1, 4).reshape(h, w, rows * cols * c))
