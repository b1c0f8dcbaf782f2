"""Synthetic H&E-like breast histology images for tests and demos.

Images are rendered physically: hematoxylin and eosin *concentration* maps
are drawn with OpenCV primitives, blurred, and turned into RGB with the
Beer-Lambert law ``rgb = 255 * exp(-(c_H * v_H + c_E * v_E))`` using typical
H&E optical-density vectors, so colours mix like real stains. Structures are
drawn at a fixed pixel size (a fixed "magnification"), so a patch of a large
image looks like a small image of the same class.

The four classes differ in ways generic CNN features pick up:

* ``normal`` - pale, loose pink stroma; lobules of small acini, each a ring
  of small nuclei around a little lumen.
* ``benign`` - larger, elongated glands with wide lumens lined by two
  layers of nuclei, more glands.
* ``insitu`` - round ducts filled with dense, larger, darker nuclei (some
  with punched-out lumens), a rim of flat myoepithelial nuclei, and
  lymphocytes in the stroma.
* ``invasive`` - dense stroma infiltrated everywhere by cords and single
  cells with large, pleomorphic, dark nuclei.

Everything random comes from the caller's :class:`numpy.random.Generator`,
so images are bit-identical for a given seed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np

from .io import write_image
from .labels import SCHEMES, canonical_label

__all__ = ["DEMO_DIFFICULTY", "SYNTHETIC_LABELS", "make_image", "write_breakhis", "write_dataset"]

#: Labels :func:`make_image` can draw.
SYNTHETIC_LABELS: tuple[str, ...] = ("normal", "benign", "insitu", "invasive")

# Optical-density vectors (R, G, B) of hematoxylin and eosin, close to the
# Macenko estimates typical for H&E slides.
_V_H = np.array([0.56, 0.72, 0.41], dtype=np.float32)
_V_E = np.array([0.21, 0.80, 0.56], dtype=np.float32)

# Sub-pixel precision for OpenCV drawing (coordinates are multiplied by 2**_SHIFT).
_SHIFT = 3
_ONE = 1 << _SHIFT


class _Maps:
    """Hematoxylin (``h``) and eosin (``e``) concentration maps being drawn."""

    def __init__(self, height: int, width: int) -> None:
        self.h = np.zeros((height, width), np.float32)
        self.e = np.zeros((height, width), np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.h.shape

    def ellipse(self, cy, cx, ry, rx, angle, h, e=None) -> None:
        """Fill an ellipse (radii in px, angle in degrees) with stain values."""
        centre = (int(round(cx * _ONE)), int(round(cy * _ONE)))
        axes = (max(1, int(round(rx * _ONE))), max(1, int(round(ry * _ONE))))
        cv2.ellipse(self.h, centre, axes, float(angle), 0, 360, float(h), -1, cv2.LINE_8, _SHIFT)
        if e is not None:
            cv2.ellipse(self.e, centre, axes, float(angle), 0, 360, float(e), -1, cv2.LINE_8, _SHIFT)

    def polygon(self, points: np.ndarray, h, e) -> None:
        """Fill a polygon given as float ``(N, 2)`` (x, y) points."""
        pts = [np.round(points * _ONE).astype(np.int32)]
        cv2.fillPoly(self.h, pts, float(h), cv2.LINE_8, _SHIFT)
        cv2.fillPoly(self.e, pts, float(e), cv2.LINE_8, _SHIFT)


# --------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-ish noise varying over about `cell` pixels."""
    h, w = shape
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _blob(rng, cy, cx, ry, rx, angle, irregularity, n=28) -> np.ndarray:
    """Points of an ellipse with a smoothly wobbling radius, as (x, y)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    # A few low-frequency harmonics give organic, non-spiky outlines.
    wobble = np.zeros(n)
    for k in (2, 3, 5):
        wobble += rng.normal(0, irregularity / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = 1.0 + wobble
    a = np.deg2rad(angle)
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    return np.stack([cx + x * np.cos(a) - y * np.sin(a), cy + x * np.sin(a) + y * np.cos(a)], axis=1)


def _nucleus(m: _Maps, cy, cx, r, elongation, angle, intensity) -> None:
    """An area-preserving ellipse of radius `r` elongated along `angle`."""
    s = np.sqrt(elongation)
    m.ellipse(cy, cx, r / s, r * s, angle, intensity)


def _place(radii, margin, sample, attempts=40) -> list[tuple[float, float, float]]:
    """Rejection-sample non-overlapping circles.

    `sample(r)` proposes a centre ``(cy, cx)`` for a circle of radius `r`.
    Returns the placed ``(cy, cx, r)``; circles that do not fit are skipped.
    """
    placed: list[tuple[float, float, float]] = []
    for r in radii:
        for _ in range(attempts):
            cy, cx = sample(r)
            if all((cy - py) ** 2 + (cx - px) ** 2 > (r + pr + margin) ** 2 for py, px, pr in placed):
                placed.append((cy, cx, r))
                break
    return placed


def _anywhere(rng, shape):
    """Centre sampler over the image, letting circles overhang the border."""
    h, w = shape
    return lambda r: (rng.uniform(-0.3 * r, h + 0.3 * r), rng.uniform(-0.3 * r, w + 0.3 * r))


def _in_disc(rng, cy, cx, radius):
    """Centre sampler keeping circles inside a disc."""
    def sample(r):
        rr, tt = (radius - r) * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        return cy + rr * np.sin(tt), cx + rr * np.cos(tt)
    return sample


def _stroma(m: _Maps, rng, scale, eosin, fibre_density, spindle_density) -> None:
    """Pink, fibrous collagen background with scattered spindle nuclei."""
    h, w = m.shape
    area = h * w / scale**2
    m.e[:] = eosin * (1.0 + 0.18 * _smooth_noise(rng, (h, w), 40 * scale))
    m.h[:] = 0.04
    # Locally aligned collagen fibres: wavy polylines following a smooth
    # orientation field, slightly darker or paler than the ground.
    orientation = _smooth_noise(rng, (h, w), 150 * scale) * 1.2 + rng.uniform(0, np.pi)
    n_fibres = int(area * fibre_density)
    starts = np.column_stack([rng.uniform(0, h, n_fibres), rng.uniform(0, w, n_fibres)])
    for y, x in starts:
        theta = orientation[int(y), int(x)]
        pts = [(x, y)]
        for _ in range(int(rng.integers(4, 10))):
            theta += rng.normal(0, 0.25)
            step = rng.uniform(6, 14) * scale
            x, y = x + step * np.cos(theta), y + step * np.sin(theta)
            pts.append((x, y))
        value = eosin * (rng.uniform(1.2, 1.5) if rng.random() < 0.75 else rng.uniform(0.35, 0.7))
        thickness = int(max(1, round(rng.uniform(0.8, 2.2) * scale)))
        poly = [np.round(np.array(pts) * _ONE).astype(np.int32)]
        cv2.polylines(m.e, poly, False, float(value), thickness, cv2.LINE_8, _SHIFT)
    # Fibroblast nuclei: thin, dark, along the local fibre direction.
    n_spindles = int(area * spindle_density)
    for _ in range(n_spindles):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        angle = np.rad2deg(orientation[int(cy), int(cx)])
        _nucleus(m, cy, cx, rng.uniform(1.8, 2.6) * scale, rng.uniform(2.5, 4.5), angle, rng.uniform(0.9, 1.4))


def _gland(m: _Maps, rng, cy, cx, ry, rx, angle, *, lumen_frac, layers, nuc_r, nuc_int, secretion=0.0,
           lumen_irregularity=0.18) -> None:
    """An epithelial gland: cytoplasm rim, lumen, rings of radial nuclei, myoepithelium."""
    m.polygon(_blob(rng, cy, cx, ry, rx, angle, 0.06), h=0.16, e=0.30)
    m.polygon(
        _blob(rng, cy, cx, ry * lumen_frac, rx * lumen_frac, angle, lumen_irregularity),
        h=0.01 + 0.2 * secretion,
        e=0.03 + secretion,
    )
    a = np.deg2rad(angle)
    for k in range(layers):
        # Rings between lumen edge and outer edge; nuclei sit side by side.
        f = lumen_frac + (1 - lumen_frac) * (k + 0.5) / (layers + 0.3)
        perimeter = np.pi * (ry + rx) * f
        n = max(5, int(perimeter / (2.3 * nuc_r)))
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        jitter = rng.normal(0, 0.12, (n, 2)) * nuc_r
        for ti, (jy, jx) in zip(t, jitter):
            x, y = rx * f * np.cos(ti), ry * f * np.sin(ti)
            px, py = cx + x * np.cos(a) - y * np.sin(a) + jx, cy + x * np.sin(a) + y * np.cos(a) + jy
            radial = np.rad2deg(np.arctan2(py - cy, px - cx))
            _nucleus(m, py, px, nuc_r * rng.uniform(0.85, 1.15), rng.uniform(1.2, 1.7), radial,
                     nuc_int * rng.uniform(0.85, 1.15))
    _myoepithelium(m, rng, cy, cx, ry, rx, angle, nuc_r * 0.8)


def _myoepithelium(m: _Maps, rng, cy, cx, ry, rx, angle, r) -> None:
    """Flat, sparse nuclei hugging the outer (basement membrane) edge."""
    a = np.deg2rad(angle)
    n = max(4, int(np.pi * (ry + rx) / (7 * r)))
    for ti in np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi):
        x, y = rx * 0.97 * np.cos(ti), ry * 0.97 * np.sin(ti)
        px, py = cx + x * np.cos(a) - y * np.sin(a), cy + x * np.sin(a) + y * np.cos(a)
        tangent = np.rad2deg(np.arctan2(py - cy, px - cx)) + 90
        _nucleus(m, py, px, r, rng.uniform(2.2, 3.2), tangent, rng.uniform(1.0, 1.3))


# --------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------


def _draw_normal(m: _Maps, rng, scale) -> None:
    h, w = m.shape
    _stroma(m, rng, scale, eosin=0.30, fibre_density=1 / 700, spindle_density=1 / 2500)
    n_lobules = max(1, int(round(h * w / scale**2 / 160_000 * rng.uniform(1.2, 2.0))))
    for cy, cx, big_r in _place(rng.uniform(55, 90, n_lobules) * scale, 20 * scale, _anywhere(rng, (h, w))):
        # Looser, paler, more cellular intralobular stroma around the acini.
        m.polygon(_blob(rng, cy, cx, big_r, big_r * rng.uniform(0.8, 1.2), rng.uniform(0, 180), 0.15), h=0.06, e=0.2)
        for _ in range(int(big_r**2 / (60 * scale**2))):
            rr, tt = big_r * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            _nucleus(m, cy + rr * np.sin(tt), cx + rr * np.cos(tt), 1.9 * scale, rng.uniform(1, 2.5),
                     rng.uniform(0, 180), 1.1)
        radii = rng.uniform(9, 15, int(big_r**2 / (170 * scale**2))) * scale
        for ay, ax, r in _place(radii, 2.5 * scale, _in_disc(rng, cy, cx, big_r * 0.9)):
            _gland(m, rng, ay, ax, r, r * rng.uniform(0.85, 1.2), rng.uniform(0, 180),
                   lumen_frac=rng.uniform(0.22, 0.38), layers=1, nuc_r=rng.uniform(2.0, 2.5) * scale, nuc_int=1.15)


def _draw_benign(m: _Maps, rng, scale) -> None:
    h, w = m.shape
    _stroma(m, rng, scale, eosin=0.38, fibre_density=1 / 400, spindle_density=1 / 2500)
    n = max(2, int(h * w / scale**2 / 11000 * rng.uniform(0.8, 1.2)))
    radii = np.sort(rng.uniform(18, 48, n) * scale)[::-1]  # big ones first pack better
    for cy, cx, r in _place(radii, 8 * scale, _anywhere(rng, (h, w))):
        elong = rng.uniform(1.0, 2.2)
        _gland(m, rng, cy, cx, r / np.sqrt(elong), r * np.sqrt(elong), rng.uniform(0, 180),
               lumen_frac=rng.uniform(0.5, 0.68), layers=2, nuc_r=rng.uniform(2.6, 3.2) * scale,
               nuc_int=rng.uniform(1.15, 1.35), secretion=0.1 * rng.random(), lumen_irregularity=0.3)


def _draw_insitu(m: _Maps, rng, scale) -> None:
    h, w = m.shape
    area = h * w / scale**2
    _stroma(m, rng, scale, eosin=0.40, fibre_density=1 / 600, spindle_density=1 / 3000)
    n = max(2, int(area / 8000 * rng.uniform(0.8, 1.2)))
    radii = np.sort(rng.uniform(26, 50, n) * scale)[::-1]
    ducts = _place(radii, 6 * scale, _anywhere(rng, (h, w)))
    # Lymphocytes: small, round, very dark cells gathered around the ducts.
    for cy, cx, r in ducts:
        for _ in range(int(r / scale * rng.uniform(0.5, 1.5))):
            rr, tt = r + abs(rng.normal(0, 12 * scale)), rng.uniform(0, 2 * np.pi)
            _nucleus(m, cy + rr * np.sin(tt), cx + rr * np.cos(tt), rng.uniform(2.0, 2.6) * scale, 1.1, 0, 1.9)
    for cy, cx, r in ducts:
        elong = rng.uniform(1.0, 1.3)
        ry, rx, angle = r / np.sqrt(elong), r * np.sqrt(elong), rng.uniform(0, 180)
        m.polygon(_blob(rng, cy, cx, ry, rx, angle, 0.05), h=0.24, e=0.30)
        # Packed, enlarged, darker nuclei filling the whole duct.
        nuc_r = rng.uniform(3.2, 4.2) * scale
        count = int(0.75 * ry * rx / nuc_r**2)
        rr, tt = np.sqrt(rng.random(count)) * 0.92, rng.uniform(0, 2 * np.pi, count)
        a = np.deg2rad(angle)
        for ri, ti in zip(rr, tt):
            x, y = rx * ri * np.cos(ti), ry * ri * np.sin(ti)
            _nucleus(m, cy + x * np.sin(a) + y * np.cos(a), cx + x * np.cos(a) - y * np.sin(a),
                     nuc_r * rng.uniform(0.8, 1.25), rng.uniform(1.0, 1.5), rng.uniform(0, 180),
                     rng.uniform(1.3, 1.8))
        if rng.random() < 0.5:  # cribriform: round punched-out spaces
            for _ in range(int(rng.integers(2, 6))):
                rr_, tt_ = 0.6 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
                m.ellipse(cy + ry * rr_ * np.sin(tt_), cx + rx * rr_ * np.cos(tt_), *(rng.uniform(3, 7, 2) * scale), 0,
                          h=0.01, e=0.04)
        elif rng.random() < 0.4:  # comedo necrosis: pink-grey centre with nuclear debris
            m.polygon(_blob(rng, cy, cx, ry * 0.35, rx * 0.35, angle, 0.2), h=0.25, e=0.38)
            for _ in range(int(rng.integers(3, 10))):
                m.ellipse(cy + rng.normal(0, ry * 0.12), cx + rng.normal(0, rx * 0.12), 1.2 * scale, 1.2 * scale, 0,
                          h=1.6)
        _myoepithelium(m, rng, cy, cx, ry, rx, angle, 2.4 * scale)


def _draw_invasive(m: _Maps, rng, scale) -> None:
    h, w = m.shape
    area = h * w / scale**2
    _stroma(m, rng, scale, eosin=0.45, fibre_density=1 / 500, spindle_density=1 / 2000)
    cells = []
    # Cords and nests: short random walks of tumour cells...
    for _ in range(int(area / 1500)):
        y, x, theta = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(3, 12))):
            cells.append((y, x))
            theta += rng.normal(0, 0.6)
            step = rng.uniform(9, 13) * scale
            y, x = y + step * np.sin(theta), x + step * np.cos(theta)
    # ...plus single cells infiltrating everywhere.
    n_single = int(area / 650)
    cells += list(zip(rng.uniform(0, h, n_single), rng.uniform(0, w, n_single)))
    cells = np.array(cells)
    # Pleomorphic: broad size, shape and darkness distributions.
    radii = rng.gamma(6.0, 0.75, len(cells)).clip(2.8, 9.0) * scale
    for (cy, cx), r in zip(cells, radii):
        m.ellipse(cy, cx, r * 1.6, r * 1.9, rng.uniform(0, 180), h=0.18, e=0.30)  # cytoplasm
    for (cy, cx), r in zip(cells, radii):
        _nucleus(m, cy, cx, r, rng.uniform(1.0, 2.0), rng.uniform(0, 180), rng.uniform(1.3, 2.3))
        if rng.random() < 0.3:  # prominent nucleolus
            m.ellipse(cy + rng.normal(0, r / 4), cx + rng.normal(0, r / 4), r / 4, r / 4, 0, h=2.6)


_DRAW = {"normal": _draw_normal, "benign": _draw_benign, "insitu": _draw_insitu, "invasive": _draw_invasive}

# The classes a pathologist confuses with each: neighbours on the normal -> invasive scale.
_NEIGHBOURS = {"normal": ("benign",), "benign": ("normal", "insitu"), "insitu": ("benign", "invasive"),
               "invasive": ("insitu",)}

#: Difficulty of the demo data set (``pipeline.extract --data synthetic``): hard enough that the
#: demo report shows errors and distinct ROC curves, as a real one does.
DEMO_DIFFICULTY = 0.35


def _confuse(maps: _Maps, rng, canon: str, difficulty: float, scale: float) -> None:
    """Replace a vertical band of up to ``difficulty`` of the width with a neighbouring class."""
    fraction = rng.uniform(0.0, difficulty)
    height, width = maps.shape
    band = int(round(fraction * width))
    if band < 1:
        return
    x0 = int(rng.integers(0, width - band + 1))
    other = _Maps(height, band)
    neighbours = _NEIGHBOURS[canon]
    _DRAW[neighbours[int(rng.integers(len(neighbours)))]](other, rng, scale)
    maps.h[:, x0:x0 + band] = other.h
    maps.e[:, x0:x0 + band] = other.e


def make_image(
    label: str,
    rng: np.random.Generator,
    size: tuple[int, int] = (768, 1024),
    *,
    tumour_region: tuple[int, int, int, int] | None = None,
    scale: float = 1.0,
    difficulty: float = 0.0,
) -> np.ndarray:
    """Render one synthetic H&E-like image of a class.

    Parameters
    ----------
    label : {'normal', 'benign', 'insitu', 'invasive'}
        Class to draw (a bach4 label, any spelling accepted by
        :func:`data.labels.canonical_label`).
    rng : numpy.random.Generator
        Source of all randomness; the same generator state gives the same
        image bit for bit.
    size : tuple of int, optional
        ``(height, width)`` in pixels.
    tumour_region : tuple of int, optional
        ``(y0, x0, y1, x1)`` box (half-open, clipped to the image) in which
        invasive tissue replaces the `label` tissue, e.g. to test heatmaps.
    scale : float, optional
        Size of all structures relative to the default magnification (nuclei
        of about 2-8 px radius); 2.0 looks like a 2x higher magnification.
    difficulty : float in [0, 1], optional
        0 draws every class in its textbook form (trivially separable).  Above 0, a band of
        up to `difficulty` of the width shows a neighbouring class instead (normal <-> benign
        <-> in situ <-> invasive, as mixed real fields do) and the stain varies more between
        images (sd of the stain vectors ``0.03 * (1 + 3 * difficulty)``), so some images
        are genuinely ambiguous.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` ``uint8`` RGB image.

    Raises
    ------
    ValueError
        For an unknown label, a non-positive size or scale, or an empty
        `tumour_region`.
    """
    canon = canonical_label(label)  # accepts e.g. "InSitu"; raises for unknown labels
    if canon not in _DRAW:
        raise ValueError(f"cannot draw label {label!r}; choose one of {', '.join(SYNTHETIC_LABELS)}")
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0 or scale <= 0:
        raise ValueError(f"size and scale must be positive, got size={size}, scale={scale}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")

    maps = _Maps(height, width)
    _DRAW[canon](maps, rng, scale)
    if difficulty > 0:  # no extra draw at 0: the textbook images stay bit-identical
        _confuse(maps, rng, canon, difficulty, scale)
    if tumour_region is not None:
        y0, x0, y1, x1 = (int(v) for v in tumour_region)
        y0, x0, y1, x1 = max(0, y0), max(0, x0), min(height, y1), min(width, x1)
        if y1 <= y0 or x1 <= x0:
            raise ValueError(f"tumour_region {tumour_region} is empty inside an image of size {size}")
        tumour = _Maps(y1 - y0, x1 - x0)
        _draw_invasive(tumour, rng, scale)
        maps.h[y0:y1, x0:x1] = tumour.h
        maps.e[y0:y1, x0:x1] = tumour.e
    return _render(maps, rng, scale, stain_sd=0.03 * (1 + 3 * difficulty))


def _render(m: _Maps, rng, scale, stain_sd: float = 0.03) -> np.ndarray:
    """Blur, add chromatin texture and stain variation, apply Beer-Lambert."""
    shape = m.shape
    # Grainy chromatin / uneven staining, strongest where the stain is dense.
    m.h *= 1.0 + 0.22 * _smooth_noise(rng, shape, 1.5 * scale)
    m.e *= 1.0 + 0.08 * _smooth_noise(rng, shape, 3.0 * scale)
    sigma = 0.9 * scale  # optical blur
    h = cv2.GaussianBlur(m.h, (0, 0), sigma)
    e = cv2.GaussianBlur(m.e, (0, 0), sigma)
    # Per-image stain variation, as between slides and scanners.
    v_h = _V_H + rng.normal(0, stain_sd, 3).astype(np.float32)
    v_e = _V_E + rng.normal(0, stain_sd, 3).astype(np.float32)
    h *= rng.uniform(0.9, 1.1)
    e *= rng.uniform(0.9, 1.1)
    od = h[..., None] * v_h + e[..., None] * v_e
    rgb = 250.0 * np.exp(-od) + 2.5 * rng.standard_normal(od.shape, dtype=np.float32)  # 250: not quite white glass
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def write_dataset(
    out_dir: str | os.PathLike,
    n_per_class: int = 4,
    size: tuple[int, int] = (192, 256),
    seed: int = 0,
    fmt: str = "png",
    scheme: str = "bach4",
    groups: bool = False,
    difficulty: float = 0.0,
) -> Path:
    """Write a small labelled synthetic dataset as class folders plus a manifest.

    Layout: ``out_dir/<label>/<label>_<i>.<fmt>`` for each class of `scheme`
    and ``out_dir/manifest.csv`` with columns ``path,label`` (paths relative
    to `out_dir`) and, when `groups` is true, ``group``. Both layouts load
    with :func:`data.datasets.load_dataset`.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Destination directory (created if missing).
    n_per_class : int, optional
        Images per class.
    size : tuple of int, optional
        ``(height, width)`` of each image.
    seed : int, optional
        Seed; the same arguments give bit-identical files. Image ``i`` of a
        class does not depend on `n_per_class`.
    fmt : {'png', 'jpg', 'jpeg', 'tif', 'tiff'}, optional
        File format / extension.
    scheme : {'bach4', 'bmc3', 'binary'}, optional
        Class folders to write. Merged classes alternate between their
        source classes (bmc3 ``benign`` = normal, benign, normal, ...;
        binary ``carcinoma`` = insitu, invasive, ...).
    groups : bool, optional
        If true, add a ``group`` column of patient ids, two consecutive
        images of a class per patient (``<label>_p<k>``).
    difficulty : float in [0, 1], optional
        How much the classes overlap (see :func:`make_image`); 0 (the default, for tests)
        is trivially separable, :data:`DEMO_DIFFICULTY` is the demo's.

    Returns
    -------
    pathlib.Path
        `out_dir`.

    Raises
    ------
    ValueError
        For an unknown `fmt` or `scheme`, or a negative `n_per_class`.
    """
    ext = "." + fmt.lower().lstrip(".")
    if ext not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        raise ValueError(f"unsupported format {fmt!r}; use png, jpg or tif")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    sources = {
        "normal": ("normal",), "benign": ("benign",), "insitu": ("insitu",), "invasive": ("invasive",),
        "non-carcinoma": ("normal", "benign"), "carcinoma": ("insitu", "invasive"),
    }
    if scheme == "bmc3":
        sources["benign"] = ("normal", "benign")

    out = Path(out_dir)
    rows = []
    for class_idx, label in enumerate(SCHEMES[scheme]):
        for i in range(n_per_class):
            drawn = sources[label][i % len(sources[label])]
            # Independent stream per image: stable when n_per_class changes.
            rng = np.random.default_rng([seed, class_idx, i])
            rel = f"{label}/{label}_{i}{ext}"
            write_image(out / rel, make_image(drawn, rng, size, difficulty=difficulty))
            rows.append({"path": rel, "label": label, "group": f"{label}_p{i // 2}"})

    out.mkdir(parents=True, exist_ok=True)
    fields = ["path", "label", "group"] if groups else ["path", "label"]
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out


# Slides of write_breakhis, two per subtype: odd ids as in BreakHis (letter suffixes; numbers
# shared across subtypes, 14-22549 by adenosis and fibroadenoma), used before generated ones.
_BREAKHIS_SLIDES = {
    "A": ("14-22549AB", "14-29960CD"), "F": ("14-22549CD", "14-9133"), "PT": ("14-21998AB", "14-22704"),
    "TA": ("14-3411F", "14-16184CD"), "DC": ("14-2523", "14-16716"), "LC": ("14-12204", "14-15570C"),
    "MC": ("14-18842D", "14-13418DE"), "PC": ("14-9146", "14-19440"),
}
# What write_breakhis draws for each subtype: benign tissue for benign tumours, carcinoma for
# malignant ones (so benign vs malignant is learnable; subtypes only in part).
_BREAKHIS_DRAW = {"A": "normal", "F": "benign", "PT": "benign", "TA": "benign",
                  "DC": "invasive", "LC": "invasive", "MC": "insitu", "PC": "insitu"}


def write_breakhis(
    out_dir: str | os.PathLike,
    patients_per_subtype: int = 1,
    images_per_magnification: int = 1,
    magnifications: tuple[str, ...] = ("40", "100", "200", "400"),
    size: tuple[int, int] = (46, 70),
    seed: int = 0,
    subtypes: tuple[str, ...] | None = None,
) -> Path:
    """Write a synthetic data set shaped like the BreakHis distribution.

    Layout: ``out_dir/BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/
    SOB_<B|M>_<code>_<slide>/<mag>X/SOB_<B|M>_<code>-<slide>-<mag>-<index>.png``, with the real
    data set's odd slide ids (``14-22549AB`` and ``14-22549CD`` share a number across two
    subtypes) and magnification drawn as structure size (40x small ... 400x large).

    Parameters
    ----------
    out_dir : str or os.PathLike
    patients_per_subtype : int
        Slides (patient folders) per subtype.
    images_per_magnification : int
        Images per slide and magnification.
    magnifications : tuple of str
        Subset of ``40, 100, 200, 400``.
    size : tuple of int
        ``(height, width)``; BreakHis's is (460, 700), the default a tenth of it.
    seed : int
        The same arguments give bit-identical files.
    subtypes : tuple of str, optional
        Subtype codes (default all eight: A, F, PT, TA, DC, LC, MC, PC).

    Returns
    -------
    pathlib.Path
        The ``BreaKHis_v1`` folder (what a user passes as ``--data``).
    """
    from .labels import BREAKHIS_SUBTYPES

    codes = tuple(subtypes or BREAKHIS_SUBTYPES)
    unknown = [c for c in codes if c not in BREAKHIS_SUBTYPES]
    if unknown or not set(magnifications) <= {"40", "100", "200", "400"}:
        raise ValueError(f"unknown subtype(s) {unknown} or magnification(s) {magnifications}")
    root = Path(out_dir) / "BreaKHis_v1"
    breast = root / "histology_slides" / "breast"
    for k, code in enumerate(codes):
        tumour = "B" if _BREAKHIS_DRAW[code] in ("normal", "benign") else "M"
        slides = list(_BREAKHIS_SLIDES[code]) + [f"14-{30000 + 100 * k + p}" for p in range(patients_per_subtype)]
        for p, slide in enumerate(slides[:patients_per_subtype]):
            folder = breast / ("benign" if tumour == "B" else "malignant") / "SOB" / BREAKHIS_SUBTYPES[code]
            folder = folder / f"SOB_{tumour}_{code}_{slide}"
            for mag in magnifications:
                for i in range(images_per_magnification):
                    rng = np.random.default_rng([seed, k, p, int(mag), i])
                    image = make_image(_BREAKHIS_DRAW[code], rng, size, scale=int(mag) / 200)
                    write_image(folder / f"{mag}X" / f"SOB_{tumour}_{code}-{slide}-{mag}-{i + 1:03d}.png", image)
    return root
