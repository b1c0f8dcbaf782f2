"""Colour augmentation and random crops, seeded per (seed, image, augmentation).

The colour augmentation is an affine transform of pixel intensities applied per RGB channel::

    out_c = clip(gain_c * (in_c - 128) + 128 + shift_c, 0, 255)

with ``gain_c ~ U(1 - gain_range, 1 + gain_range)`` (contrast, around mid-grey so it does not
just darken the image) and ``shift_c ~ U(-shift_range, shift_range)`` (brightness), drawn
independently for R, G and B, which also moves the hue of both stains a little.  Augmentation
index 0 is the identity: one augmented image is always the (normalised) original.

Crops are squares of ``crop_size``.  An image smaller than the crop in either dimension is
cropped with side ``min(crop_size, height, width)`` instead: the backbones end in global
pooling, so the feature is defined for any side, and up-sampling would change the apparent
magnification, which matters more in histology than the crop's pixel count.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def image_seed(image_id: str) -> int:
    """Stable 64-bit integer for an image id (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "little")


def augmentation_rng(seed: int, image_id: str, aug_index: int) -> np.random.Generator:
    """Generator for one augmentation of one image; independent of run order and resumes."""
    return np.random.default_rng([int(seed), image_seed(image_id), int(aug_index)])


@dataclass(frozen=True)
class ColorAugmentation:
    """Per-channel affine intensity transform; see the module docstring for the ranges."""

    gain_range: float = 0.1
    shift_range: float = 20.0

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        gain = rng.uniform(1.0 - self.gain_range, 1.0 + self.gain_range, size=3)
        shift = rng.uniform(-self.shift_range, self.shift_range, size=3)
        return gain, shift

    @staticmethod
    def lut(gain: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """The transform as a ``(256, 3)`` uint8 lookup table, one column per channel: what
        the extractor's graph applies on the device (:func:`apply_luts_graph`)."""
        levels = np.arange(256, dtype=np.float64)[:, None]
        lut = np.clip(np.rint(gain[None, :] * (levels - 128.0) + 128.0 + shift[None, :]), 0, 255)
        return lut.astype(np.uint8)

    def apply(self, image: np.ndarray, gain: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Apply the transform to an RGB uint8 image through a lookup table per channel."""
        lut = self.lut(gain, shift)
        return np.stack([lut[image[..., c], c] for c in range(3)], axis=-1)


def effective_crop_size(height: int, width: int, crop_size: int) -> int:
    """Side of the square crop used for an image of this size (see module docstring)."""
    return int(min(crop_size, height, width))


def crop_positions(
    rng: np.random.Generator, height: int, width: int, side: int, n_crops: int
) -> np.ndarray:
    """Top-left corners ``(n_crops, 2)`` as (y, x) of uniformly random square crops."""
    ys = rng.integers(0, height - side + 1, size=n_crops)
    xs = rng.integers(0, width - side + 1, size=n_crops)
    return np.stack([ys, xs], axis=1)


@dataclass(frozen=True)
class AugmentationDraw:
    """The random draws of one augmentation: colour transform and crop windows."""

    gain: np.ndarray
    shift: np.ndarray
    positions: np.ndarray  # (n_crops, 2) top-left (y, x)
    side: int

    def lut(self) -> np.ndarray:
        """The colour transform as a ``(256, 3)`` uint8 table (:meth:`ColorAugmentation.lut`)."""
        return ColorAugmentation.lut(self.gain, self.shift)

    @property
    def windows(self) -> np.ndarray:
        """``(n_crops, 3)`` rows ``(y, x, side)``."""
        return np.column_stack([self.positions, np.full(len(self.positions), self.side)])


def draw_augmentation(
    *, seed: int, image_id: str, aug_index: int, height: int, width: int, n_crops: int,
    crop_size: int, color: ColorAugmentation,
) -> AugmentationDraw:
    """All draws of one augmentation from :func:`augmentation_rng`; index 0 keeps the colours."""
    rng = augmentation_rng(seed, image_id, aug_index)
    gain, shift = color.sample(rng)
    if aug_index == 0:
        gain, shift = np.ones(3), np.zeros(3)
    side = effective_crop_size(height, width, crop_size)
    return AugmentationDraw(gain, shift, crop_positions(rng, height, width, side, n_crops), side)


def augmented_crops(
    image: np.ndarray,
    *,
    seed: int,
    image_id: str,
    aug_index: int,
    n_crops: int,
    crop_size: int,
    color: ColorAugmentation,
    start: int = 0,
    stop: int | None = None,
) -> np.ndarray:
    """The ``(n_crops, side, side, 3)`` uint8 crops of one colour augmentation of ``image``.

    Augmentation 0 keeps the original colours; all draws come from
    :func:`augmentation_rng` so the result depends only on the arguments.  ``start`` and
    ``stop`` select crops ``start:stop`` of the ``n_crops`` (the same draws): extraction takes
    them a batch at a time, so memory does not grow with ``n_crops`` (400 crops of 750 px
    would be 644 MiB at once).
    """
    draw = draw_augmentation(
        seed=seed, image_id=image_id, aug_index=aug_index, height=image.shape[0],
        width=image.shape[1], n_crops=n_crops, crop_size=crop_size, color=color,
    )
    side = draw.side
    positions = draw.positions[start:stop]
    crops = np.empty((len(positions), side, side, 3), dtype=np.uint8)
    for i, (y, x) in enumerate(positions):
        # Colour-transform only the crop: cheaper than the whole image when crops are small.
        crops[i] = color.apply(image[y : y + side, x : x + side], draw.gain, draw.shift)
    return crops


def apply_luts_graph(images, luts, per_image: bool):
    """In-graph colour augmentation by table lookup (:meth:`ColorAugmentation.apply`'s tables).

    ``per_image=False``: one image ``(h, w, 3)`` and ``luts`` ``(b, 256, 3)`` -> its ``b``
    augmented copies ``(b, h, w, 3)``.  ``per_image=True``: ``images`` ``(b, h, w, 3)``, each
    through its own table.  Images are uint8 or int32 pixel values; the copies come out as
    float32 pixel values (what the backbone's preprocessing takes), equal to the host's
    uint8 copies.  Gathers run on int32 indices and float32 tables: GPU kernels exist for
    those, not for uint8, which TensorFlow would silently run on the CPU.
    """
    import tensorflow as tf

    # One gather in a (b, 3 * 256) table, channel c at offset 256 * c: no per-channel slices
    # and no stack (20 % faster on CPU than three gathers).
    tables = tf.reshape(tf.transpose(tf.cast(luts, tf.float32), [0, 2, 1]), [-1, 3 * 256])
    idx = tf.cast(images, tf.int32) + tf.constant([0, 256, 512])
    return tf.gather(tables, idx, axis=1, batch_dims=1 if per_image else 0)


def crops_graph(image, positions, side: int):
    """In-graph crops: ``image`` ``(h, w, 3)``, ``positions`` ``(b, 2)`` int32 top-left
    ``(y, x)`` -> ``(b, side, side, 3)`` int32 pixel values, ``image[y:y+side, x:x+side]``."""
    import tensorflow as tf

    span = tf.range(side, dtype=positions.dtype)
    rows = tf.gather(tf.cast(image, tf.int32), positions[:, :1] + span)  # (b, side, w, 3)
    return tf.gather(rows, positions[:, 1:] + span, axis=2, batch_dims=1)


def crop_sides(paths, crop_size: int, scale: float) -> list[int]:
    """The crop sides the images of ``paths`` really get (sorted, distinct): ``crop_size``
    capped at the shorter side after resizing by ``scale``, as :func:`effective_crop_size`.

    Image sizes come from the file headers (Pillow, which matplotlib already installs; no
    decoding), so this is cheap enough for a summary.  Unreadable files are left out.
    """
    from PIL import Image  # header-only size; OpenCV would decode every pixel

    sides = set()
    for path in paths:
        try:
            with Image.open(path) as image:
                w, h = image.size
        except (OSError, ValueError, SyntaxError):
            continue
        sides.add(effective_crop_size(max(1, round(h * scale)), max(1, round(w * scale)), int(crop_size)))
    return sorted(sides)
