"""``python -m pipeline.heatmap``: where in an image a trained model sees each class.

::

    python -m pipeline.heatmap --model MODEL_DIR IMAGE [IMAGE ...] [--window N] [--step N] \\
        [--out DIR] [--exact] [--whole-image model|windows] [--classes C ...] [--weights B=FILE]

MODEL_DIR is any trained model of this package, of the kind it records (:func:`classifiers.load_model`):

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
import sys
import time
from pathlib import Path

from pipeline._common import add_weights_option, HelpFormatter, run

PROG = "python -m pipeline.heatmap"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
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
    add_weights_option(p, "use this weights file for a backbone (same sha256 as the model records)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per forward pass with --exact")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the probability layer")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map of the probability layer")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution (each panel is 4 inches wide)")
    return p


def _unique_stem(path: str, used: set) -> str:
    stem, k = Path(path).stem, 2
    name = stem
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return name


def main(argv=None) -> int:
    """Make the heatmaps; returns 0, or 2 with a message on bad input."""
    return run(build_parser(), heatmaps, argv)


def heatmaps(args) -> int:
    """Every readable image's maps, sidecar and overlay; prints one line per image."""
    from classifiers.heatmaps import render_overlay, save_heatmap
    from classifiers.model_heatmaps import open_heatmaps, read_heatmap_inputs

    maker = open_heatmaps(args.model, window=args.window, step=args.step, exact=args.exact,
                          whole_image=args.whole_image, weights=args.weights, batch_size=args.batch_size,
                          classes=args.classes)
    readable, skipped = read_heatmap_inputs(args.images)
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
