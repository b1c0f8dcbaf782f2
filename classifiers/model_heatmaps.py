"""Heatmaps of a trained model, whatever its kind (``pipeline.heatmap``'s library side).

Each model kind's ``heatmaps()`` returns one of the makers here, which turns one image into
``(image as the model sees it, Heatmap)``; :func:`open_heatmaps` does it for a model
directory and checks the options, :func:`read_heatmap_inputs` reads the images, skipping
unreadable ones.  The window geometry per kind is in docs/heatmaps.md.
"""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)

#: ``--whole-image`` choices: the model's own whole-image prediction, or the windows' mean.
WHOLE_IMAGE = ("model", "windows")
#: Default step of deep-feature model windows, in pixels of the resized image.
FEATURE_STEP = 128


def _check_window(window: int | None, needed: int, what: str) -> int:
    if window is not None and window != needed:
        raise ValueError(f"{what} classifies {needed}-pixel windows only; drop `window` or pass `window={needed}`")
    return needed


class FeatureModelHeatmaps:
    """Heatmaps of a deep-feature model (``pipeline.train``): one backbone pass per image, every
    window pooled from its feature map (``exact``: every window through the backbone)."""

    def __init__(self, model, *, window=None, step=None, exact=False, whole_image="model",
                 weights=None, batch_size=8):
        from classifiers.heatmaps import FeatureSource
        from classifiers.feature.predict import reproducible_configs
        from features.extract import make_extractor

        self.model, self.exact, self.whole_image = model, exact, whole_image
        self.classes = tuple(self.model.classes)
        self.weights = dict(weights or {})
        self.configs = reproducible_configs(self.model, self.weights)
        self.window = window or self.configs[0].crop_size
        if not self.window:  # mode "whole": trained on whole images, no crop size to inherit
            raise ValueError("this model was trained on whole images (extraction mode 'whole'); "
                             "choose the heatmap window side (pixels) with `window`")
        self.step = step or FEATURE_STEP
        batch = batch_size if exact else 1  # feature_maps pads its batch: 1 image per pass
        self.sources = [FeatureSource(make_extractor(c, batch_size=batch), c.scale, c.stain) for c in self.configs]
        self.whole = {}

    def prepare(self, paths) -> None:
        """The model's own whole-image predictions (every augmentation, majority vote)."""
        if self.whole_image != "model":
            return
        from classifiers.feature.predict import predict_images

        result = predict_images(self.model, paths, weights=self.weights)
        for row in result.table.to_dict("records"):
            self.whole[row["image"]] = row

    def __call__(self, path: str, raw):
        from classifiers.heatmaps import feature_heatmap
        from features.transforms import scale_image

        heatmap = feature_heatmap(raw, self.sources, self.model.fitted, window=self.window, step=self.step,
                                  classes=self.model.classes, exact=self.exact)
        row = self.whole.get(path)
        if row is not None:
            votes = ", ".join(f"{c} {row[f'votes_{c}']}" for c in heatmap.classes if row[f"votes_{c}"])
            heatmap.image_proba = np.array([row[f"proba_{c}"] for c in heatmap.classes])
            heatmap.image_label = row["prediction"]
            heatmap.image_source = f"model vote over {row['n_aug']} augmentations: {votes}"
        return scale_image(raw, self.configs[0].scale), heatmap


class PatchCNNHeatmaps:
    """Heatmaps of a patch ConvNet (``pipeline.patch_cnn train``): 32-pixel windows, step 8."""

    def __init__(self, model, *, window=None, step=None):
        from classifiers.patch_cnn.model import PATCH_SIZE

        self.model = model
        self.classes = tuple(self.model.classes)
        self.window = _check_window(window, PATCH_SIZE, "the patch ConvNet")
        self.step = step or 8

    def prepare(self, paths) -> None:
        pass

    def __call__(self, path: str, raw):
        from classifiers.heatmaps import sliding_window_heatmap
        from features.transforms import scale_image

        image = scale_image(raw, self.model.config.scale)
        heatmap = sliding_window_heatmap(image, self.model.predict_proba, self.model.classes, window=self.window,
                                         step=self.step, batch_size=2048, scale=self.model.config.scale,
                                         method="patch ConvNet, window by window")
        return image, heatmap


class TwoStageHeatmaps:
    """Heatmaps of a two-stage model: windows of its patch size through the patch-wise network,
    step a quarter patch; the whole-image class is the two-stage prediction."""

    def __init__(self, model, *, window=None, step=None, whole_image="model"):
        self.whole_image, self.model = whole_image, model
        self.classes = tuple(self.model.classes_)
        k = self.model.cfg.patch_size
        self.window = _check_window(window, k, "the two-stage model's patch-wise network")
        self.step = step or max(1, k // 4)

    def prepare(self, paths) -> None:
        pass

    def _patch_proba(self, crops):
        net, b = self.model.patch_net_, self.model.cfg.inference_batch_size
        return np.concatenate([np.asarray(net(crops[i:i + b].astype(np.float32), training=False))
                               for i in range(0, len(crops), b)])

    def __call__(self, path: str, raw):
        from classifiers.heatmaps import sliding_window_heatmap
        from classifiers.two_stage.model import TwoStageInputError
        from features.transforms import scale_image

        cfg = self.model.cfg
        image = self.model.preprocess(raw, path)
        heatmap = sliding_window_heatmap(image, self._patch_proba, self.model.classes_, window=self.window,
                                         step=self.step, batch_size=cfg.inference_batch_size, scale=cfg.scale,
                                         method="two-stage patch-wise network, window by window")
        if self.whole_image == "model":
            try:
                heatmap.image_proba = np.asarray(self.model.predict_proba(raw)[0], dtype=float)
                heatmap.image_source = "two-stage prediction"
            except TwoStageInputError as exc:
                heatmap.notes.append(f"no two-stage prediction ({exc}); title shows the mean of the windows")
        return scale_image(raw, cfg.scale), heatmap


def open_heatmaps(model, *, window: int | None = None, step: int | None = None, exact: bool = False,
                  whole_image: str = "model", weights=None, batch_size: int = 8, classes=None):
    """The heatmap maker of ``model``: a :class:`~classifiers.protocol.Model`, or a model directory.

    Parameters
    ----------
    window, step : int, optional
        Window side and step in pixels of the resized image; default per model kind.
    exact : bool
        Deep-feature models: every window through the backbone instead of one pooled map.
    whole_image : {"model", "windows"}
        Whole-image class: the model's own prediction, or the mean of the windows.
    weights : dict or iterable of (backbone, file) pairs, optional
        Weights files for a deep-feature model's backbones.
    batch_size : int
        Crops per forward pass with ``exact``.
    classes : sequence of str, optional
        Classes to draw; each must be one of the model's.

    Returns
    -------
    object
        ``maker.classes``, ``maker.prepare(paths)`` (call once with every path first) and
        ``maker(path, raw) -> (image, Heatmap)``.
    """
    if (window is not None and window < 1) or (step is not None and step < 1):
        raise ValueError("`window` and `step` must be >= 1 pixel")
    if whole_image not in WHOLE_IMAGE:
        raise ValueError(f"whole_image must be one of {WHOLE_IMAGE}, got {whole_image!r}")
    from classifiers.protocol import load_model

    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    maker = model.heatmaps(window=window, step=step, exact=exact, whole_image=whole_image,
                           weights=dict(weights or {}), batch_size=batch_size)
    unknown = sorted(set(classes or ()) - set(maker.classes))
    if unknown:
        raise ValueError(f"`classes` {unknown} not among the model's classes {', '.join(maker.classes)}")
    return maker


def read_heatmap_inputs(paths) -> tuple[list, list]:
    """``([(path, image), ...], [(path, reason), ...])``: unreadable images are logged and
    skipped; an error when none is readable."""
    from data.io import ImageReadError, read_image

    readable, skipped = [], []
    for path in paths:
        try:
            readable.append((path, read_image(path)))
        except ImageReadError as exc:
            skipped.append((path, exc.reason))
            log.warning("skipped %s: %s", path, exc.reason)
    if not readable:
        raise ValueError("no readable image: " + "; ".join(f"{p}: {r}" for p, r in skipped))
    return readable, skipped
