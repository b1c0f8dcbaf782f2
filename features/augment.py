"""Colour augmentation and random crops, seeded per (seed, image, augmentation).

The colour augmentation is an affine transform of pixel intensities applied per RGB channel::

    out_c = clip(gain_c * (in_c - 128) + 128 + shift_c, 0, 255)

with ``gain_c ~ U(1 - gain_range, 1 + gain_range)`` (contrast, around mid-grey so it does not
just darken the image) and ``shift_c ~ U(-shift_range, shift_range)`` (brightness), drawn
independently for R, G and B, which also moves the hue of both stains a little.  Augmentation
index 0 is the identity: one augmented image is always the (normalised) original.

:class:`HEDAugmentation` (``color_augmentation="hed"``) is the alternative of Tellez et al. (2019,
"HED-light"): pixels go to optical density (OD), are split into haematoxylin, eosin and DAB
concentrations by colour deconvolution (Ruifrok & Johnston's matrix, as ``skimage.color``'s
``rgb2hed``), each concentration becomes ``alpha_s * c_s + beta_s`` with ``alpha_s ~ U(1 - sigma,
1 + sigma)`` and ``beta_s ~ U(-sigma, sigma)``, and the result goes back to RGB.  It moves the
stains themselves (a paler haematoxylin, a redder eosin) rather than the RGB channels.  Being
linear in OD, the whole augmentation is one 3x3 matrix plus an offset in OD space
(:meth:`HEDAugmentation.table`), which mixes channels, so it cannot be a per-channel table.
Both augmentations draw six numbers per augmentation before the crop windows, so the two
give the same crops for the same (seed, image, augmentation).

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


def affine_draw(rng: np.random.Generator, scale_range: float, shift_range: float):
    """Per-channel ``(scale ~ U(1 -+ scale_range), shift ~ U(-+ shift_range))``, 3 values each, in
    that order (the order fixes every store's draws)."""
    return (rng.uniform(1.0 - scale_range, 1.0 + scale_range, size=3),
            rng.uniform(-shift_range, shift_range, size=3))


def identity_draw() -> tuple[np.ndarray, np.ndarray]:
    """The draw of augmentation 0, which leaves the image as it is: scale 1, shift 0 per channel."""
    return np.ones(3), np.zeros(3)


@dataclass(frozen=True)
class ColorAugmentation:
    """Per-channel affine intensity transform; see the module docstring for the ranges."""

    gain_range: float = 0.1
    shift_range: float = 20.0

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return affine_draw(rng, self.gain_range, self.shift_range)

    @staticmethod
    def lut(gain: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """The transform as a ``(256, 3)`` uint8 lookup table, one column per channel: what
        the extractor's graph applies on the device (:func:`apply_luts_graph`)."""
        levels = np.arange(256, dtype=np.float64)[:, None]
        lut = np.clip(np.rint(gain[None, :] * (levels - 128.0) + 128.0 + shift[None, :]), 0, 255)
        return lut.astype(np.uint8)

    # The interface HEDAugmentation shares: identity draw, the per-augmentation table the
    # extractor takes, its application on the host and in the graph.
    identity = staticmethod(identity_draw)
    table = lut

    @staticmethod
    def apply_table(image: np.ndarray, table: np.ndarray) -> np.ndarray:
        """``image`` (uint8 RGB, any leading shape) through a :meth:`lut` table."""
        return np.stack([table[image[..., c], c] for c in range(3)], axis=-1)

    @staticmethod
    def apply_graph(images, tables, per_image: bool):
        return apply_luts_graph(images, tables, per_image)

    def apply(self, image: np.ndarray, gain: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Apply the transform to an RGB uint8 image through a lookup table per channel."""
        return self.apply_table(image, self.lut(gain, shift))


# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB; columns: OD of R, G, B),
# the values of skimage.color.rgb_from_hed; skimage is not a dependency, and these nine numbers
# are all that is used of it.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# Optical density of each uint8 level, -ln(max(v / 255, 1e-6)) as skimage's rgb2hed (natural
# log, as Tellez et al.'s HED augmentation used it); a table, so host and graph take the same
# float32 values.
OD_TABLE = (-np.log(np.maximum(np.arange(256) / 255.0, 1e-6))).astype(np.float32)


@dataclass(frozen=True)
class HEDAugmentation:
    """Per-stain affine transform of the haematoxylin, eosin and DAB concentrations (HED-light of
    Tellez et al. 2019 at ``sigma=0.05``); see the module docstring.

    Parameters
    ----------
    sigma : half-width of the draws: ``alpha ~ U(1 - sigma, 1 + sigma)``, ``beta ~ U(-sigma, sigma)``
        (concentrations in natural-log optical density units; typical H&E stains reach 0.3-1).
    """

    sigma: float = 0.05

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return affine_draw(rng, self.sigma, self.sigma)

    identity = staticmethod(identity_draw)

    @staticmethod
    def table(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """The transform in OD space as a ``(4, 3)`` float32 array: rows 0-2 the matrix ``M``,
        row 3 the offset ``b``, with ``od_out = od_in @ M + b`` (row vectors).

        ``M = I + HED_FROM_RGB @ diag(alpha - 1) @ RGB_FROM_HED`` is ``HED_FROM_RGB @ diag(alpha)
        @ RGB_FROM_HED`` written so that ``alpha = 1`` gives exactly the identity matrix.
        """
        alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
        matrix = np.eye(3) + HED_FROM_RGB @ np.diag(alpha - 1.0) @ RGB_FROM_HED
        return np.vstack([matrix, beta @ RGB_FROM_HED]).astype(np.float32)

    @staticmethod
    def apply_table(image: np.ndarray, table: np.ndarray) -> np.ndarray:
        """``image`` (uint8 RGB, any leading shape) through a :meth:`table` transform: OD, the
        matrix and offset, back to intensities rounded to uint8 (float32, as the graph)."""
        od = OD_TABLE[image]
        out = od.reshape(-1, 3) @ table[:3] + table[3]
        rgb = np.rint(np.float32(255.0) * np.exp(-out))
        return np.clip(rgb, 0, 255).astype(np.uint8).reshape(image.shape)

    @staticmethod
    def apply_graph(images, tables, per_image: bool):
        return apply_hed_graph(images, tables, per_image)

    def apply(self, image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Apply the transform to an RGB uint8 image."""
        return self.apply_table(image, self.table(alpha, beta))


#: ``color_augmentation`` names (``ExtractionConfig``) -> augmentation classes.
COLOR_AUGMENTATIONS = ("rgb", "hed")


def color_augmentation(config) -> "ColorAugmentation | HEDAugmentation":
    """The colour augmentation of an :class:`~features.config.ExtractionConfig`."""
    if config.color_augmentation == "hed":
        return HEDAugmentation(config.hed_sigma)
    return ColorAugmentation(config.color_gain, config.color_shift)


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
    """The random draws of one augmentation: colour transform and crop windows.  ``gain`` and
    ``shift`` are the per-channel draws of ``color``: RGB gain and shift, or HED alpha and beta."""

    gain: np.ndarray
    shift: np.ndarray
    positions: np.ndarray  # (n_crops, 2) top-left (y, x)
    side: int
    color: "ColorAugmentation | HEDAugmentation" = ColorAugmentation()

    def table(self) -> np.ndarray:
        """The colour transform as the extractor takes it: a ``(256, 3)`` uint8 table
        (:meth:`ColorAugmentation.lut`) or a ``(4, 3)`` float32 OD transform
        (:meth:`HEDAugmentation.table`)."""
        return self.color.table(self.gain, self.shift)

    @property
    def windows(self) -> np.ndarray:
        """``(n_crops, 3)`` rows ``(y, x, side)``."""
        return np.column_stack([self.positions, np.full(len(self.positions), self.side)])


def draw_augmentation(
    *, seed: int, image_id: str, aug_index: int, height: int, width: int, n_crops: int,
    crop_size: int, color: ColorAugmentation | HEDAugmentation,
) -> AugmentationDraw:
    """All draws of one augmentation from :func:`augmentation_rng`; index 0 keeps the colours."""
    rng = augmentation_rng(seed, image_id, aug_index)
    gain, shift = color.sample(rng)
    if aug_index == 0:
        gain, shift = color.identity()
    side = effective_crop_size(height, width, crop_size)
    return AugmentationDraw(gain, shift, crop_positions(rng, height, width, side, n_crops), side, color)


def augmented_crops(
    image: np.ndarray,
    *,
    seed: int,
    image_id: str,
    aug_index: int,
    n_crops: int,
    crop_size: int,
    color: ColorAugmentation | HEDAugmentation,
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


def apply_hed_graph(images, tables, per_image: bool):
    """In-graph HED augmentation (:meth:`HEDAugmentation.apply_table`), with
    :func:`apply_luts_graph`'s shapes; ``tables`` ``(b, 4, 3)`` float32 OD transforms.

    In the graph rather than on the host: the image still goes to the device once per image
    (not once per augmentation), and TensorFlow's exp and matrix product use every core (a
    1024x768 image took 28 ms per augmentation on 2 busy cores, numpy on the host 94 ms, and
    Lite1 multi-level's pass about 290 ms).
    float32 like the host's; TensorFlow's exp may differ from numpy's in the last bit, so a
    pixel on a rounding edge can come out one level apart (a test bounds it).
    """
    import tensorflow as tf

    od = tf.gather(tf.constant(OD_TABLE), tf.cast(images, tf.int32))
    tables = tf.cast(tables, tf.float32)
    matrix, offset = tables[:, :3, :], tables[:, 3, None, None, :]
    equation = "bhwc,bcd->bhwd" if per_image else "hwc,bcd->bhwd"
    out = tf.einsum(equation, od, matrix) + offset
    return tf.clip_by_value(tf.round(255.0 * tf.exp(-out)), 0.0, 255.0)


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
