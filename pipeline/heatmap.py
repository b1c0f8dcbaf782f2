"""``python -m pipeline.heatmap``: where in an image a trained model sees each class.

::

    python -m pipeline.heatmap --model MODEL_DIR IMAGE [IMAGE ...] [--window N] [--step N] \\
        [--out DIR] [--exact] [--whole-image model|windows] [--classes C ...] [--weights B=FILE]

MODEL_DIR is any trained model of this package, recognised by its files:

* ``model.json`` (``pipeline.train``, deep features + XGBoost / logistic regression): the
  backbone runs once per image and every window is pooled from its feature map
  (``--exact``: every window through the backbone).  Default window: the model's crop size
  (750), step 128, in pixels of the image resized by the model's ``scale``.  The whole-image
  class is the model's own prediction (``pipeline.predict``: all augmentations, majority vote).
* ``patch_cnn.json`` (``pipeline.patch_cnn train``): 32-pixel windows, step 8.
* ``config.json`` of a two-stage model (``pipeline.two_stage train``): windows of its patch
  size classified by the patch-wise network, step a quarter patch; the whole-image class is
  the two-stage prediction.

For each image, OUT gets ``<stem>.<class>.npy`` (one probability per window, grid rows x
cols), ``<stem>.heatmap.json`` (window positions, classes, whole-image prediction) and
``<stem>.heatmap.png`` (the image and one overlay per class with a colourbar).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

# Passive OpenMP waiting before XGBoost / scikit-learn load (see pipeline/cv_report.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("pipeline.heatmap")
PROG = "python -m pipeline.heatmap"


def _weights_pair(text: str) -> tuple:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected BACKBONE=FILE, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Slide a window over images, classify every window with a trained model, and "
        "write per-class probability maps (.npy), their geometry (.json) and an overlay PNG.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="model directory (pipeline.train, pipeline.patch_cnn train or pipeline.two_stage train)")
    p.add_argument("--window", type=int, default=None,
                   help="window side in pixels of the resized image (default: the model's crop / patch size)")
    p.add_argument("--step", type=int, default=None,
                   help="window step in pixels (default: 128 for deep features, 8 for the patch ConvNet, "
                   "a quarter patch for the two-stage model)")
    p.add_argument("--out", default="heatmaps", metavar="DIR", help="output folder")
    p.add_argument("--exact", action="store_true",
                   help="deep-feature models: run every window through the backbone instead of pooling "
                   "one feature map (slow; for comparison)")
    p.add_argument("--whole-image", default="model", choices=("model", "windows"),
                   help="whole-image class in the title: the model's own prediction, or the mean of the "
                   "window probabilities")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="classes to draw (default: all; with two classes the second)")
    p.add_argument("--weights", action="append", type=_weights_pair, default=[], metavar="BACKBONE=FILE",
                   help="use this weights file for a backbone (same sha256 as the model records)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per forward pass with --exact")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the probability layer")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map of the probability layer")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution (each panel is 4 inches wide)")
    return p


def model_kind(model_dir: Path) -> str:
    """``"features"``, ``"patch_cnn"`` or ``"two_stage"`` from the files in ``model_dir``."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if (model_dir / "model.json").is_file():
        return "features"
    if (model_dir / "patch_cnn.json").is_file():
        return "patch_cnn"
    config = model_dir / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("model") == "two_stage":
                return "two_stage"
        except ValueError:
            pass
    raise ValueError(f"{model_dir} is not a model directory of this package (no model.json, patch_cnn.json "
                     "or two-stage config.json); make one with pipeline.train, pipeline.patch_cnn train or "
                     "pipeline.two_stage train")


def _check_window(window: int | None, needed: int, what: str) -> int:
    if window is not None and window != needed:
        raise ValueError(f"{what} classifies {needed}-pixel windows only; drop --window or pass --window {needed}")
    return needed


class FeatureModelMaps:
    """Heatmaps of a ``pipeline.train`` model (deep features + classifier)."""

    def __init__(self, model_dir: Path, args):
        from classifiers.heatmap import FeatureSource
        from classifiers.feature.model_io import load_model
        from classifiers.feature.predict import reproducible_configs
        from features.extract import FeatureExtractor

        self.args, self.model = args, load_model(model_dir)
        self.weights = dict(args.weights)
        self.configs = reproducible_configs(self.model, self.weights)
        self.window = args.window or self.configs[0].crop_size
        if not self.window:  # mode "whole": trained on whole images, no crop size to inherit
            raise ValueError("this model was trained on whole images (extraction mode 'whole'); "
                             "choose the heatmap window side with --window PIXELS")
        self.step = args.step or 128
        batch = args.batch_size if args.exact else 1  # feature_maps pads its batch: 1 image per pass
        self.sources = [FeatureSource(FeatureExtractor(c, batch_size=batch), c.scale, c.stain) for c in self.configs]
        self.whole = {}

    def prepare(self, paths) -> None:
        """The model's own whole-image predictions (every augmentation, majority vote)."""
        if self.args.whole_image != "model":
            return
        from classifiers.feature.predict import predict_images

        result = predict_images(self.model, paths, weights=self.weights)
        for row in result.table.to_dict("records"):
            self.whole[row["image"]] = row

    def __call__(self, path: str, raw):
        from classifiers.heatmap import feature_heatmap
        from features.transforms import scale_image

        heatmap = feature_heatmap(raw, self.sources, self.model.fitted, window=self.window, step=self.step,
                                  classes=self.model.classes, exact=self.args.exact)
        row = self.whole.get(path)
        if row is not None:
            votes = ", ".join(f"{c} {row[f'votes_{c}']}" for c in heatmap.classes if row[f"votes_{c}"])
            heatmap.image_proba = np.array([row[f"proba_{c}"] for c in heatmap.classes])
            heatmap.image_label = row["prediction"]
            heatmap.image_source = f"model vote over {row['n_aug']} augmentations: {votes}"
        return scale_image(raw, self.configs[0].scale), heatmap


class PatchCNNMaps:
    """Heatmaps of a patch ConvNet (``pipeline.patch_cnn train``)."""

    def __init__(self, model_dir: Path, args):
        from classifiers.patch_cnn.model import PATCH_SIZE, PatchCNN

        self.model = PatchCNN.load(model_dir)
        self.window = _check_window(args.window, PATCH_SIZE, "the patch ConvNet")
        self.step = args.step or 8

    def prepare(self, paths) -> None:
        pass

    def __call__(self, path: str, raw):
        from classifiers.heatmap import sliding_window_heatmap
        from features.transforms import scale_image

        image = scale_image(raw, self.model.config.scale)
        heatmap = sliding_window_heatmap(image, self.model.predict_proba, self.model.classes, window=self.window,
                                         step=self.step, batch_size=2048, scale=self.model.config.scale,
                                         method="patch ConvNet, window by window")
        return image, heatmap


class TwoStageMaps:
    """Heatmaps of a two-stage model: windows of its patch size through the patch-wise network."""

    def __init__(self, model_dir: Path, args):
        from classifiers.two_stage.model import TwoStageModel

        self.args, self.model = args, TwoStageModel.load(model_dir)
        k = self.model.cfg.patch_size
        self.window = _check_window(args.window, k, "the two-stage model's patch-wise network")
        self.step = args.step or max(1, k // 4)

    def prepare(self, paths) -> None:
        pass

    def _patch_proba(self, crops):
        net, b = self.model.patch_net_, self.model.cfg.inference_batch_size
        return np.concatenate([np.asarray(net(crops[i:i + b].astype(np.float32), training=False))
                               for i in range(0, len(crops), b)])

    def __call__(self, path: str, raw):
        from classifiers.heatmap import sliding_window_heatmap
        from classifiers.two_stage.model import TwoStageInputError
        from features.transforms import scale_image

        cfg = self.model.cfg
        image = self.model.preprocess(raw, path)
        heatmap = sliding_window_heatmap(image, self._patch_proba, self.model.classes_, window=self.window,
                                         step=self.step, batch_size=cfg.inference_batch_size, scale=cfg.scale,
                                         method="two-stage patch-wise network, window by window")
        if self.args.whole_image == "model":
            try:
                heatmap.image_proba = np.asarray(self.model.predict_proba(raw)[0], dtype=float)
                heatmap.image_source = "two-stage prediction"
            except TwoStageInputError as exc:
                heatmap.notes.append(f"no two-stage prediction ({exc}); title shows the mean of the windows")
        return scale_image(raw, cfg.scale), heatmap


MAKERS = {"features": FeatureModelMaps, "patch_cnn": PatchCNNMaps, "two_stage": TwoStageMaps}


def _unique_stem(path: str, used: set) -> str:
    stem, k = Path(path).stem, 2
    name = stem
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


def main(argv=None) -> int:
    """Make the heatmaps; returns 0, or 2 with a message on bad input."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from classifiers.heatmap import render_overlay, save_heatmap
    from data.io import ImageReadError, read_image

    if (args.window is not None and args.window < 1) or (args.step is not None and args.step < 1):
        print(f"{PROG}: error: --window and --step must be >= 1 pixel", file=sys.stderr)
        return 2
    try:
        kind = model_kind(Path(args.model))
        maker = MAKERS[kind](Path(args.model), args)
        if args.classes:
            known = tuple(getattr(maker.model, "classes", None) or maker.model.classes_)
            unknown = sorted(set(args.classes) - set(known))
            if unknown:
                raise ValueError(f"--classes {unknown} not among the model's classes {', '.join(known)}")
        readable, skipped = [], []
        for path in args.images:
            try:
                readable.append((path, read_image(path)))
            except ImageReadError as exc:
                skipped.append((path, exc.reason))
                log.warning("skipped %s: %s", path, exc.reason)
        if not readable:
            raise ValueError("no readable image: " + "; ".join(f"{p}: {r}" for p, r in skipped))
        maker.prepare([p for p, _ in readable])
        lines, used = [], set()
        for path, raw in readable:
            start = time.perf_counter()
            image, heatmap = maker(path, raw)
            stem = _unique_stem(path, used)
            files = save_heatmap(heatmap, args.out, stem, image=path)
            png = render_overlay(image, heatmap, Path(args.out) / f"{stem}.heatmap.png", classes=args.classes,
                                 title=Path(path).name, alpha=args.alpha, cmap=args.cmap, dpi=args.dpi)
            lines.append(report_line(path, heatmap, png, files["json"], time.perf_counter() - start))
    except (FileNotFoundError, ValueError) as exc:  # incl. model format / compatibility errors
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    lines += [f"skipped {p}: {r}" for p, r in skipped]
    print("\n".join(lines))
    return 0


def report_line(path, heatmap, png, sidecar, seconds: float) -> str:
    """One image's result: prediction, grid, files, time."""
    rows, cols = heatmap.grid.shape
    shares = ", ".join(f"{c} {100 * f:.0f}%" for c, f in heatmap.window_fractions.items())
    notes = "".join(f"\n  note: {n}" for n in heatmap.notes)
    return (f"{path}: whole image {heatmap.prediction} ({heatmap.image_source}); {rows}x{cols} windows of "
            f"{heatmap.grid.side} px, step {heatmap.grid.step} px; windows by top class: {shares}; "
            f"{png} and {sidecar} in {seconds:.1f} s{notes}")


if __name__ == "__main__":
    sys.exit(main())
