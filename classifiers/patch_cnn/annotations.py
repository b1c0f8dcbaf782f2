"""Point annotations (BreCaHAD style) and the tumour / non-tumour patches sampled from them.

Design notes: docs/patch-cnn.md, "Design notes: annotations and patches".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Canonical object classes of BreCaHAD.
CLASS_NAMES: tuple[str, ...] = ("tumour", "non_tumour", "mitosis", "apoptosis", "tubule", "non_tubule")
TUMOUR = "tumour"
CONVENTIONS = ("auto", "normalised", "pixels")


class AnnotationError(ValueError):
    """An annotation file cannot be used; the message names the file and the problem."""


class NoAnnotationsError(AnnotationError):
    """The image has no annotated object at all."""


def canonical_class(name: str) -> str | None:
    """``"Non-Tumor"`` -> ``"non_tumour"``; ``None`` for a name that is none of :data:`CLASS_NAMES`."""
    key = "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())
    key = key.replace("tumor", "tumour")
    key = {"nontumour": "non_tumour", "nontubule": "non_tubule"}.get(key, key)
    return key if key in CLASS_NAMES else None


@dataclass(frozen=True)
class PointAnnotations:
    """Annotated points of one image, in pixels.

    Attributes
    ----------
    points : dict
        Class -> ``(n, 2)`` float array of ``(y, x)`` pixel coordinates (every class of
        :data:`CLASS_NAMES`, possibly empty).
    height, width : int
        Image size the points were checked against.
    convention : str
        ``"normalised"`` or ``"pixels"``: how the file was read.
    source : str
        File name, for messages.
    dropped : list of dict
        Points outside the image dropped with ``outside="drop"``.
    """

    points: dict
    height: int
    width: int
    convention: str
    source: str = "<dict>"
    dropped: list = field(default_factory=list)

    @property
    def counts(self) -> dict:
        return {c: int(len(p)) for c, p in self.points.items()}

    @property
    def n_points(self) -> int:
        return sum(self.counts.values())

    def all_points(self) -> np.ndarray:
        """``(n, 2)`` ``(y, x)`` points of every class."""
        return np.concatenate([p.reshape(-1, 2) for p in self.points.values()])


def _point(item, source: str, name: str, index: int) -> tuple[float, float]:
    """``(x, y)`` of one JSON point."""
    if isinstance(item, dict) and "x" in item and "y" in item:
        x, y = item["x"], item["y"]
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        x, y = item
    else:
        raise AnnotationError(f"{source}: point {index} of class {name!r} is {item!r}; expected "
                              '{"x": .., "y": ..} or [x, y]')
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        raise AnnotationError(f"{source}: point {index} of class {name!r} has non-numeric "
                              f"coordinates {item!r}") from None
    if not (np.isfinite(x) and np.isfinite(y)):
        raise AnnotationError(f"{source}: point {index} of class {name!r} has non-finite coordinates {item!r}")
    return x, y


def detect_convention(xy: np.ndarray, source: str = "<dict>") -> str:
    """``"normalised"`` or ``"pixels"`` for ``(n, 2)`` raw coordinates (see module docstring)."""
    if len(xy) == 0:
        return "normalised"
    in_unit = np.all((xy >= 0) & (xy <= 1), axis=1)
    if in_unit.all():
        return "normalised"
    if in_unit.mean() > 0.5:
        bad = xy[~in_unit][:3].tolist()
        raise AnnotationError(
            f"{source}: {in_unit.sum()} of {len(xy)} points are in [0, 1] (normalised coordinates) but "
            f"{(~in_unit).sum()} are not, e.g. (x, y) = {bad}; fix them, or state the convention "
            "(`convention='normalised'` or `convention='pixels'`) to get the points outside the image reported or dropped"
        )
    return "pixels"


def parse_annotations(
    record,
    height: int,
    width: int,
    *,
    convention: str = "auto",
    outside: str = "error",
    source: str = "<dict>",
) -> PointAnnotations:
    """Parse one BreCaHAD-style record (module docstring) into pixel points.

    Parameters
    ----------
    record : dict
        Class name -> list of points.
    height, width : int
        Size of the image the points belong to (after any resize: normalised coordinates
        scale with it; pixel coordinates must be given at the size they were made for).
    convention : {"auto", "normalised", "pixels"}
    outside : {"error", "drop"}
        What to do with points outside the image.
    source : str
        Named in error messages.

    Raises
    ------
    AnnotationError
        Not a mapping of lists, unknown class name, malformed point, ambiguous convention,
        a point outside the image (with ``outside="error"``).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if outside not in ("error", "drop"):
        raise ValueError(f"outside must be 'error' or 'drop', got {outside!r}")
    if not isinstance(record, dict):
        raise AnnotationError(f"{source}: expected a JSON object mapping class names to point lists, "
                              f"got {type(record).__name__}")
    raw = {}
    for name, items in record.items():
        canon = canonical_class(name)
        if canon is None:
            raise AnnotationError(f"{source}: unknown object class {name!r}; known classes: "
                                  f"{', '.join(CLASS_NAMES)} (any case, tumor/tumour, -/_/space)")
        if not isinstance(items, list):
            raise AnnotationError(f"{source}: class {name!r} must map to a list of points")
        pts = [_point(item, source, name, i) for i, item in enumerate(items)]
        raw[canon] = np.concatenate([raw.get(canon, np.zeros((0, 2))), np.asarray(pts).reshape(-1, 2)])
    everything = np.concatenate([p for p in raw.values()] or [np.zeros((0, 2))])
    used = detect_convention(everything, source) if convention == "auto" else convention
    limit = np.array([1.0, 1.0]) if used == "normalised" else np.array([width, height], dtype=float)
    to_pixels = np.array([width, height], dtype=float) if used == "normalised" else np.ones(2)
    points, dropped = {}, []
    for canon in CLASS_NAMES:
        xy = raw.get(canon, np.zeros((0, 2)))
        bad = np.any((xy < 0) | (xy > limit), axis=1)
        if bad.any() and outside == "error":
            raise AnnotationError(
                f"{source}: {bad.sum()} {canon} point(s) outside the {width}x{height} image "
                f"({used} coordinates), e.g. (x, y) = {xy[bad][0].tolist()}; fix the file or drop "
                "such points (`outside='drop'`)")
        dropped += [{"class": canon, "x": float(x), "y": float(y)} for x, y in xy[bad]]
        pix = xy[~bad] * to_pixels
        # On the right / bottom edge (x == width) means the last pixel.
        pix = np.minimum(pix, np.array([width, height]) - 1e-6)
        points[canon] = pix[:, ::-1].copy()  # (x, y) -> (y, x)
    return PointAnnotations(points, int(height), int(width), used, source, dropped)


def read_annotations(path: Path | str, height: int, width: int, **options) -> PointAnnotations:
    """Read and :func:`parse_annotations` a JSON file.

    Raises
    ------
    AnnotationError
        Missing or invalid JSON, or anything :func:`parse_annotations` refuses.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such annotation file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from None
    return parse_annotations(record, height, width, source=str(path), **options)


# ---------------------------------------------------------------------------------------------
# patch sampling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchSampling:
    """How patches are drawn from an annotated image.

    Parameters
    ----------
    patch_size : int
        Patch side (32 for the patch ConvNet).
    jitter : int
        Tumour patches are centred on their point up to a uniform shift of +-``jitter`` pixels
        per axis (the point stays inside the patch).
    margin : int
        Non-tumour patches keep every annotated point at least this far outside the patch
        (points mark nucleus centres; the nucleus itself extends a few pixels).
    negatives_per_positive : float
        Non-tumour patches per tumour patch of the same image...
    min_negatives : int
        ...but at least this many per image (images without tumour points give only these).
    max_positives : int, optional
        Keep at most this many tumour points per image (a seeded random subset).
    """

    patch_size: int = 32
    jitter: int = 8
    margin: int = 4
    negatives_per_positive: float = 1.0
    min_negatives: int = 16
    max_positives: int | None = None

    def __post_init__(self):
        if self.patch_size < 1 or self.jitter < 0 or self.margin < 0 or self.min_negatives < 0:
            raise ValueError("patch_size must be >= 1 and jitter, margin, min_negatives >= 0")
        if self.negatives_per_positive < 0:
            raise ValueError("negatives_per_positive must be >= 0")
        if self.max_positives is not None and self.max_positives < 0:
            raise ValueError("max_positives must be >= 0")


def tumour_patch_positions(points: np.ndarray, height: int, width: int, sampling: PatchSampling,
                           rng: np.random.Generator) -> np.ndarray:
    """Top-left ``(y, x)`` of patches around ``(y, x)`` points, each containing its point."""
    s = sampling.patch_size
    cells = np.floor(np.asarray(points, dtype=float).reshape(-1, 2)).astype(np.int64)
    shift = rng.integers(-sampling.jitter, sampling.jitter + 1, size=cells.shape)
    start = cells - s // 2 + shift
    # Keep the point inside the patch, then the patch inside the image.
    start = np.clip(start, cells - s + 1, cells)
    return np.clip(start, 0, np.array([height - s, width - s]))


def free_patch_positions(points: np.ndarray, height: int, width: int, n: int, sampling: PatchSampling,
                         rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` distinct random top-lefts of patches with no point within ``margin``."""
    s, m = sampling.patch_size, sampling.margin
    occupied = np.zeros((height + 1, width + 1), dtype=np.int64)
    cells = np.floor(np.asarray(points, dtype=float).reshape(-1, 2)).astype(np.int64)
    np.add.at(occupied, (cells[:, 0] + 1, cells[:, 1] + 1), 1)
    table = occupied.cumsum(0).cumsum(1)  # table[i, j] = points in rows < i, cols < j
    ys = np.arange(height - s + 1)
    xs = np.arange(width - s + 1)
    r0, r1 = np.clip(ys - m, 0, height), np.clip(ys + s + m, 0, height)
    c0, c1 = np.clip(xs - m, 0, width), np.clip(xs + s + m, 0, width)
    inside = (table[r1][:, c1] - table[r0][:, c1] - table[r1][:, c0] + table[r0][:, c0])
    free = np.flatnonzero(inside == 0)
    chosen = rng.choice(free, size=min(n, len(free)), replace=False) if len(free) else free
    return np.column_stack(np.unravel_index(np.sort(chosen), inside.shape)).astype(np.int64)


def sample_patches(image: np.ndarray, annotations: PointAnnotations, sampling: PatchSampling,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tumour (label 1) and non-tumour (label 0) patches of one image (module docstring).

    Returns
    -------
    patches : numpy.ndarray
        ``(n, patch_size, patch_size, 3)`` uint8.
    labels : numpy.ndarray
        ``(n,)`` int64, 1 = tumour.
    positions : numpy.ndarray
        ``(n, 2)`` top-left ``(y, x)``.

    Raises
    ------
    NoAnnotationsError
        The image has no annotated point.
    ValueError
        The image is smaller than a patch or not the size the points were checked against.
    """
    h, w = image.shape[:2]
    s = sampling.patch_size
    if (h, w) != (annotations.height, annotations.width):
        raise ValueError(f"{annotations.source}: annotations are for a {annotations.width}x"
                         f"{annotations.height} image, got {w}x{h}")
    if annotations.n_points == 0:
        raise NoAnnotationsError(f"{annotations.source}: no annotated object, so tumour-free tissue "
                                 "cannot be told from unannotated tissue")
    if min(h, w) < s:
        raise ValueError(f"{annotations.source}: image {w}x{h} is smaller than one {s}-pixel patch")
    tumour = annotations.points[TUMOUR]
    if sampling.max_positives is not None and len(tumour) > sampling.max_positives:
        tumour = tumour[np.sort(rng.choice(len(tumour), sampling.max_positives, replace=False))]
    pos = tumour_patch_positions(tumour, h, w, sampling, rng)
    n_neg = max(sampling.min_negatives, int(round(len(pos) * sampling.negatives_per_positive)))
    neg = free_patch_positions(annotations.all_points(), h, w, n_neg, sampling, rng)
    positions = np.concatenate([pos, neg]).astype(np.int64)
    labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    patches = np.stack([image[y:y + s, x:x + s] for y, x in positions]) if len(positions) else \
        np.zeros((0, s, s, 3), np.uint8)
    return patches, labels, positions


# ---------------------------------------------------------------------------------------------
# synthetic annotated data (tests and the offline demo)
# ---------------------------------------------------------------------------------------------


def synthetic_annotated_image(rng: np.random.Generator, size: tuple[int, int] = (256, 320),
                              points_per_kpx: float = 4.0) -> tuple[np.ndarray, dict, tuple]:
    """A synthetic normal image with an invasive box, and BreCaHAD-style annotations of it.

    Tumour points are uniform in the box (``points_per_kpx`` per 1000 pixels); a few
    ``non_tumor`` points lie outside it.  Coordinates are normalised, as in BreCaHAD.

    Returns
    -------
    image : numpy.ndarray
    record : dict
        ``{"tumor": [{"x", "y"}, ...], "non_tumor": [...]}``.
    box : tuple
        ``(y0, x0, y1, x1)`` of the tumour region.
    """
    from data.synthetic import make_image

    h, w = size
    bh, bw = (int(v) for v in rng.integers([h // 3, w // 3], [2 * h // 3 + 1, 2 * w // 3 + 1]))
    y0, x0 = (int(v) for v in rng.integers([0, 0], [h - bh + 1, w - bw + 1]))
    box = (y0, x0, y0 + bh, x0 + bw)
    image = make_image("normal", rng, size, tumour_region=box)
    n = max(1, int(bh * bw * points_per_kpx / 1000))
    tumour = np.column_stack([rng.uniform(y0 + 2, y0 + bh - 2, n), rng.uniform(x0 + 2, x0 + bw - 2, n)])
    others = rng.uniform([0, 0], [h, w], size=(64, 2))
    outside_box = ~((others[:, 0] >= y0 - 8) & (others[:, 0] < y0 + bh + 8)
                    & (others[:, 1] >= x0 - 8) & (others[:, 1] < x0 + bw + 8))
    others = others[outside_box][:6]

    def to_json(points):
        return [{"x": round(float(x) / w, 6), "y": round(float(y) / h, 6)} for y, x in points]

    return image, {"tumor": to_json(tumour), "non_tumor": to_json(others)}, box


def write_synthetic_annotated(out_dir: Path | str, n_images: int = 10, size: tuple[int, int] = (256, 320),
                              seed: int = 0) -> Path:
    """Write ``images/synth_<i>.png`` and ``groundTruth/synth_<i>.json`` (BreCaHAD layout)."""
    from data.io import write_image

    out = Path(out_dir)
    (out / "groundTruth").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image, record, _ = synthetic_annotated_image(np.random.default_rng([seed, i]), size)
        write_image(out / "images" / f"synth_{i}.png", image)
        (out / "groundTruth" / f"synth_{i}.json").write_text(json.dumps(record))
    return out
