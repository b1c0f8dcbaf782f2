"""Class-probability heatmaps: slide a window over an image and classify every window.

Design notes: docs/heatmaps.md, "Design notes: windows and maps".
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class WindowGrid:
    """Square windows at the crossings of ``ys`` x ``xs`` (top-left corners, pixels).

    Attributes
    ----------
    height, width : int
        Image size the grid was made for.
    side : int
        Window side.
    step : int
        Requested step (the last start of an axis may be closer to its neighbour).
    ys, xs : numpy.ndarray
        Row and column starts, increasing.
    """

    height: int
    width: int
    side: int
    step: int
    ys: np.ndarray
    xs: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the grid."""
        return len(self.ys), len(self.xs)

    @property
    def windows(self) -> np.ndarray:
        """``(rows * cols, 3)`` int64 rows ``(y, x, side)``, row-major."""
        yy, xx = np.meshgrid(self.ys, self.xs, indexing="ij")
        return np.column_stack([yy.ravel(), xx.ravel(), np.full(yy.size, self.side)]).astype(np.int64)

    @property
    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Window centres along y and x (pixels, may be half-integers)."""
        return self.ys + self.side / 2, self.xs + self.side / 2

    def to_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "side": self.side, "step": self.step,
                "ys": self.ys.tolist(), "xs": self.xs.tolist()}


def axis_starts(length: int, side: int, step: int) -> np.ndarray:
    """Starts ``0, step, ...`` of windows of ``side`` over ``length``, the last flush with the end."""
    last = length - side
    starts = np.arange(0, last + 1, step, dtype=np.int64)
    if starts[-1] != last:
        starts = np.append(starts, last)  # the border window: nothing is left uncovered
    return starts


def window_grid(height: int, width: int, window: int, step: int) -> WindowGrid:
    """The grid of :class:`WindowGrid` covering a ``height x width`` image (module docstring).

    Raises
    ------
    ValueError
        If ``window`` or ``step`` is below 1 or the image is empty.
    """
    if window < 1 or step < 1:
        raise ValueError(f"window and step must be >= 1 pixel, got window={window}, step={step}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot slide a window over an empty {height}x{width} image")
    side = int(min(window, height, width))
    return WindowGrid(int(height), int(width), side, int(step),
                      axis_starts(height, side, step), axis_starts(width, side, step))


@dataclass
class Heatmap:
    """Per-window class probabilities of one image.

    Attributes
    ----------
    proba : numpy.ndarray
        ``(rows, cols, n_classes)`` float32, cell ``(r, c)`` = window at ``(ys[r], xs[c])``.
    grid : WindowGrid
    classes : tuple of str
    scale : float
        Model pixels per original image pixel (the model's resize).
    method : str
        How windows were classified (for people: README, titles, JSON).
    image_proba : numpy.ndarray, optional
        Whole-image class probabilities; the mean over windows when not given.
    image_source : str
        Where ``image_proba`` comes from.
    image_label : str, optional
        Whole-image class when it is not the argmax of ``image_proba`` (e.g. a majority vote).
    notes : list of str
        Anything the reader should know (e.g. stain normalisation skipped).
    """

    proba: np.ndarray
    grid: WindowGrid
    classes: tuple
    scale: float = 1.0
    method: str = ""
    image_proba: np.ndarray | None = None
    image_source: str = "mean of the window probabilities"
    image_label: str | None = None
    notes: list = field(default_factory=list)

    def __post_init__(self):
        self.proba = np.asarray(self.proba, dtype=np.float32)
        self.classes = tuple(str(c) for c in self.classes)
        if self.proba.shape != (*self.grid.shape, len(self.classes)):
            raise ValueError(f"proba has shape {self.proba.shape}, expected "
                             f"{(*self.grid.shape, len(self.classes))} (grid rows, cols, classes)")
        if self.image_proba is None:
            self.image_proba = self.proba.reshape(-1, len(self.classes)).mean(axis=0)
        self.image_proba = np.asarray(self.image_proba, dtype=np.float64)

    @property
    def prediction(self) -> str:
        """Whole-image class: ``image_label``, else the argmax of ``image_proba``."""
        return self.image_label or self.classes[int(np.argmax(self.image_proba))]

    @property
    def window_fractions(self) -> dict:
        """Share of windows whose most probable class is each class."""
        top = self.proba.reshape(-1, len(self.classes)).argmax(axis=1)
        return {c: float(np.mean(top == j)) for j, c in enumerate(self.classes)}

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise ValueError(f"unknown class {name!r}; the model's classes are {', '.join(self.classes)}")
        return self.classes.index(name)

    def class_map(self, name: str) -> np.ndarray:
        """``(rows, cols)`` probability of class ``name`` per window."""
        return self.proba[..., self.class_index(name)]

    def to_image(self) -> np.ndarray:
        """``(height, width, n_classes)`` map: each pixel averages the windows covering it."""
        return coverage_average(self.proba, self.grid)


def coverage_average(values: np.ndarray, grid: WindowGrid) -> np.ndarray:
    """Upsample per-window ``values`` (rows, cols, k) to pixels by averaging covering windows.

    Sums are accumulated in a 2-D difference array (four corner updates per window, then two
    cumulative sums), so the cost does not grow with the window area.
    """
    values = np.asarray(values, dtype=np.float64)
    h, w, s = grid.height, grid.width, grid.side
    y0, x0 = np.meshgrid(grid.ys, grid.xs, indexing="ij")
    acc = np.zeros((h + 1, w + 1, values.shape[-1]))
    count = np.zeros((h + 1, w + 1))
    for dy, dx, sign in ((0, 0, 1), (s, 0, -1), (0, s, -1), (s, s, 1)):
        np.add.at(acc, (y0 + dy, x0 + dx), sign * values)
        np.add.at(count, (y0 + dy, x0 + dx), sign)
    acc = acc.cumsum(0).cumsum(1)[:h, :w]
    count = count.cumsum(0).cumsum(1)[:h, :w]
    return (acc / count[..., None]).astype(np.float32)  # count >= 1 everywhere (full cover)


# ---------------------------------------------------------------------------------------------
# classifying the windows
# ---------------------------------------------------------------------------------------------


def window_crops(image: np.ndarray, grid: WindowGrid, start: int = 0, stop: int | None = None) -> np.ndarray:
    """The ``(n, side, side, 3)`` crops of windows ``start:stop`` (row-major) of ``grid``."""
    s = grid.side
    return np.stack([image[y:y + s, x:x + s] for y, x, _ in grid.windows[start:stop]])


def sliding_window_heatmap(
    image: np.ndarray,
    predict_proba: Callable[[np.ndarray], np.ndarray],
    classes: Sequence[str],
    *,
    window: int,
    step: int,
    batch_size: int = 256,
    scale: float = 1.0,
    method: str = "window by window",
) -> Heatmap:
    """Classify every window's crop with ``predict_proba``; the generic path.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` image as the model takes it (already resized / normalised).
    predict_proba : callable
        ``(n, side, side, 3)`` uint8 crops -> ``(n, len(classes))`` probabilities.
    classes : sequence of str
    window, step : int
        Window side and step in pixels of ``image``.
    batch_size : int
        Crops per call (memory only).
    scale : float
        Recorded in the result: model pixels per original pixel.
    method : str
        Recorded in the result.
    """
    grid = window_grid(image.shape[0], image.shape[1], window, step)
    n = grid.shape[0] * grid.shape[1]
    parts = [np.asarray(predict_proba(window_crops(image, grid, i, i + batch_size)), dtype=np.float32)
             for i in range(0, n, batch_size)]
    proba = np.concatenate(parts).reshape(*grid.shape, -1)
    return Heatmap(proba, grid, tuple(classes), scale=scale, method=method)


@dataclass
class FeatureSource:
    """One feature store's way of seeing an image: its backbone, resize and stain normaliser.

    Attributes
    ----------
    extractor : FeatureExtractor-like
        Has ``feature_maps(images)``, ``features(crops)`` and ``spec.stride``.  Its
        ``batch_size`` pads ``feature_maps`` batches, so 1 is best for heatmaps.
    scale : float
        The store's resize factor (``ExtractionConfig.scale``).
    stain : dict, optional
        Macenko parameters (``ExtractionConfig.stain``); ``None``: no normalisation.
    """

    extractor: object
    scale: float = 1.0
    stain: dict | None = None

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, str | None]:
        """Resize and normalise as extraction does (augmentation 0 is the identity)."""
        from features.transforms import scale_image
        from features.stain import StainNormalizer

        image = scale_image(np.asarray(image), self.scale)
        if self.stain is None:
            return image, None
        return StainNormalizer.from_params(self.stain).transform_or_keep(image)


def pooled_window_features(image: np.ndarray, extractor, grid: WindowGrid) -> np.ndarray:
    """``(n_windows, dim)`` features pooled from one feature map of the whole ``image``."""
    from features.feature_maps import pool_windows

    feature_map = extractor.feature_maps(image[None])[0]
    return pool_windows(feature_map, grid.windows, extractor.spec.stride)


def exact_window_features(image: np.ndarray, extractor, grid: WindowGrid, batch_size: int = 64) -> np.ndarray:
    """``(n_windows, dim)`` features of every window's crop run through the backbone."""
    n = grid.shape[0] * grid.shape[1]
    return np.concatenate([extractor.features(window_crops(image, grid, i, i + batch_size))
                           for i in range(0, n, batch_size)])


def feature_heatmap(
    image: np.ndarray,
    sources: FeatureSource | Sequence[FeatureSource],
    classifier,
    *,
    window: int,
    step: int,
    classes: Sequence[str] | None = None,
    exact: bool = False,
) -> Heatmap:
    """Heatmap of a deep-feature model from one backbone pass per store (module docstring).

    Parameters
    ----------
    image : numpy.ndarray
        The original ``(H, W, 3)`` uint8 image (each source resizes and normalises it).
    sources : FeatureSource or sequence of FeatureSource
        One per feature store of the model; all must share one ``scale``.
    classifier : object with ``predict_proba``
        Gets the ``(n_windows, dim)`` features for a single source, or the list of every
        source's matrix for a sequence (as :meth:`classifiers.evaluation.cross_validation.FittedModel.predict_proba`).
    window, step : int
        In pixels of the resized image (the unit of ``--crop-size``).
    classes : sequence of str, optional
        Defaults to ``classifier.classes_`` or ``classifier.classes``.
    exact : bool
        Run every window's crop through the backbone instead of pooling the map.

    Returns
    -------
    Heatmap
        ``notes`` lists images kept unnormalised (Macenko failed) with the reason.
    """
    single = isinstance(sources, FeatureSource)
    sources = [sources] if single else list(sources)
    if len({s.scale for s in sources}) != 1:
        raise ValueError("the model's feature stores resize images differently "
                         f"({sorted({s.scale for s in sources})}); one window grid cannot serve them all")
    if classes is None:
        classes = getattr(classifier, "classes_", None)
        classes = getattr(classifier, "classes", None) if classes is None else classes
    Xs, notes, grid = [], [], None
    for source in sources:
        prepared, note = source.prepare(image)
        if note:
            notes.append(f"kept unnormalised: {note}")
        grid = window_grid(prepared.shape[0], prepared.shape[1], window, step)
        features = exact_window_features if exact else pooled_window_features
        Xs.append(features(prepared, source.extractor, grid))
    proba = np.asarray(classifier.predict_proba(Xs[0] if single else Xs), dtype=np.float32)
    method = ("window by window through the backbone" if exact
              else f"windows pooled from one feature map (stride {sources[0].extractor.spec.stride})")
    return Heatmap(proba.reshape(*grid.shape, -1), grid, tuple(classes), scale=sources[0].scale,
                   method=method, notes=sorted(set(notes)))


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def save_heatmap(heatmap: Heatmap, out_dir: Path | str, stem: str, *, image: str = "") -> dict:
    """Write ``<stem>.<class>.npy`` (grid resolution, float32) and ``<stem>.heatmap.json``.

    Returns
    -------
    dict
        ``class -> npy path`` and ``"json" -> path``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c in heatmap.classes:
        paths[c] = out / f"{stem}.{c}.npy"
        np.save(paths[c], heatmap.class_map(c))
    record = {
        "image": image, "classes": list(heatmap.classes), "prediction": heatmap.prediction,
        "image_proba": dict(zip(heatmap.classes, map(float, heatmap.image_proba))),
        "image_source": heatmap.image_source, "window_fractions": heatmap.window_fractions,
        "method": heatmap.method, "scale": heatmap.scale, "notes": heatmap.notes,
        "resolution": "one value per window (grid rows x cols); window (r, c) has its top-left "
                      "corner at (ys[r], xs[c]) in pixels of the image resized by 'scale'",
        "files": {c: p.name for c, p in paths.items()},
        "grid": heatmap.grid.to_dict(),
    }
    paths["json"] = out / f"{stem}.heatmap.json"
    paths["json"].write_text(json.dumps(record, indent=2))
    return paths


def default_shown_classes(classes: Sequence[str]) -> tuple:
    """Every class, except for two classes the second only (the positive one)."""
    return tuple(classes[1:]) if len(classes) == 2 else tuple(classes)


def render_overlay(
    image: np.ndarray,
    heatmap: Heatmap,
    path: Path | str,
    *,
    classes: Sequence[str] | None = None,
    title: str = "",
    alpha: float = 0.5,
    cmap: str = "jet",
    panel_inches: float = 4.0,
    dpi: int = 100,
) -> Path:
    """PNG: the image, then per class the image under its semi-transparent probability map.

    Parameters
    ----------
    image : numpy.ndarray
        RGB image at the heatmap's resolution (the resized image, original colours).
    heatmap : Heatmap
    path : path
        PNG to write (parents are created).
    classes : sequence of str, optional
        Classes to draw (:func:`default_shown_classes` by default).
    title : str
        First title line (e.g. the file name); the whole-image prediction is added.
    alpha, cmap : float, str
        Opacity and matplotlib colour map of the probability layer (0 to 1, shared colourbar).
    panel_inches, dpi : float, int
        Width of each panel and resolution (100 dpi: 400 pixels per panel).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg via savefig

    classes = tuple(classes) if classes else default_shown_classes(heatmap.classes)
    pixel_map = heatmap.to_image()
    h, w = pixel_map.shape[:2]
    if image.shape[:2] != (h, w):
        raise ValueError(f"image is {image.shape[:2]} but the heatmap grid covers {(h, w)}")
    n = 1 + len(classes)
    fig = Figure(figsize=(panel_inches * n + 0.8, panel_inches * h / w + 0.9), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title(f"image ({w}x{h} px)", fontsize=9)
    layer = None
    for ax, c in zip(axes[1:], classes):
        ax.imshow(image)
        layer = ax.imshow(pixel_map[..., heatmap.class_index(c)], cmap=cmap, alpha=alpha, vmin=0.0,
                          vmax=1.0, interpolation="nearest")
        ax.set_title(f"P({c}); window max {heatmap.class_map(c).max():.2f}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(layer, ax=list(axes), fraction=0.02, pad=0.01)
    bar.solids.set_alpha(1.0)  # the legend shows the colours at full strength
    bar.set_label("class probability")
    p = heatmap.image_proba[heatmap.class_index(heatmap.prediction)]
    head = f"{title}: " if title else ""
    fig.suptitle(
        f"{head}whole image -> {heatmap.prediction} (p = {p:.2f}, {heatmap.image_source})\n"
        f"windows {heatmap.grid.side} px, step {heatmap.grid.step} px, {heatmap.grid.shape[0]}x"
        f"{heatmap.grid.shape[1]} windows; {heatmap.method}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
