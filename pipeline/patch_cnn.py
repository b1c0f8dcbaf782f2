"""``python -m pipeline.patch_cnn``: the 32x32 tumour / non-tumour patch ConvNet.

::

    python -m pipeline.patch_cnn train --images DIR [--annotations DIR] --out MODEL_DIR [options]
    python -m pipeline.patch_cnn synthetic --out DIR [--images 10]

``train`` reads every image of ``--images`` with its ``<stem>.json`` point annotations from
``--annotations`` (BreCaHAD: ``images/`` and ``groundTruth/``; see
:mod:`classifiers.patch_cnn.annotations` for the format and coordinate conventions), cuts tumour patches
around tumour points and non-tumour patches away from every annotated point, splits the images
70/15/15 into training / validation / test, trains the network of
:mod:`classifiers.patch_cnn.model` and saves it.  Images without annotation file or without any
annotated object are skipped and listed; an invalid annotation file (unknown class, point
outside the image, malformed point) stops the run before training, listing every bad file.
``synthetic`` writes a BreCaHAD-style synthetic set (normal tissue with an invasive box) to try
it offline.  Heatmaps: ``python -m pipeline.heatmap --model MODEL_DIR IMAGE`` (window 32, step 8).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline._common import add_training_options, HelpFormatter, run, training_config

log = logging.getLogger("pipeline.patch_cnn")
PROG = "python -m pipeline.patch_cnn"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from classifiers.patch_cnn.annotations import PatchSampling
    from classifiers.patch_cnn.model import PatchCNNConfig

    d, s = PatchCNNConfig, PatchSampling
    fmt = HelpFormatter
    p = argparse.ArgumentParser(prog=PROG, description="Tumour / non-tumour patch ConvNet "
                                "(Glavcheva, Yaloveha and Podorozhniak) trained from point annotations.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", formatter_class=fmt, help="train on annotated images and save the model")
    t.add_argument("--images", required=True, help="folder of images (jpg, png, tif)")
    t.add_argument("--annotations", default=None, help="folder of <image stem>.json files (default: --images)")
    t.add_argument("--out", required=True, type=Path, help="model directory to write")
    t.add_argument("--coordinates", default="auto", choices=("auto", "normalised", "pixels"),
                   help="annotation coordinates: detected per file, or forced")
    t.add_argument("--drop-outside-points", action="store_true",
                   help="drop (and list) points outside their image instead of stopping")
    add_training_options(t, d, seed_help="weights, split, sampling, batch order", quiet_help="no per-epoch lines")
    t.add_argument("--dropout", type=float, default=d.dropout)
    t.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share of images for test")
    t.add_argument("--jitter", type=int, default=s.jitter, help="max shift of a tumour patch off its point (px)")
    t.add_argument("--margin", type=int, default=s.margin,
                   help="non-tumour patches keep annotated points this far outside (px)")
    t.add_argument("--negatives-per-positive", type=float, default=s.negatives_per_positive,
                   help="non-tumour patches per tumour patch of an image")
    t.add_argument("--min-negatives", type=int, default=s.min_negatives, help="non-tumour patches per image at least")
    t.add_argument("--max-positives", type=int, default=None, help="tumour points used per image at most")
    t.add_argument("--overwrite", action="store_true", help="replace an existing patch ConvNet directory")
    g = sub.add_parser("synthetic", formatter_class=fmt, help="write a synthetic annotated data set")
    g.add_argument("--out", required=True, type=Path, help="folder for images/ and groundTruth/")
    g.add_argument("--images", type=int, default=10, help="number of images")
    g.add_argument("--size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"), help="image size")
    g.add_argument("--seed", type=int, default=0)
    return p


def train(args) -> str:
    """Build patches, train, save; returns the report."""
    from classifiers.patch_cnn.annotations import PatchSampling
    from classifiers.patch_cnn.model import (
        RECORD_FILE, PATCH_SIZE, PatchCNNConfig, build_patch_dataset, pair_annotation_files, train_patch_cnn,
    )

    config = PatchCNNConfig(**training_config(args), dropout=args.dropout, test_fraction=args.test_fraction)
    sampling = PatchSampling(patch_size=PATCH_SIZE, jitter=args.jitter, margin=args.margin,
                             negatives_per_positive=args.negatives_per_positive,
                             min_negatives=args.min_negatives, max_positives=args.max_positives)
    out = args.out
    if out.exists() and any(out.iterdir()) and not (args.overwrite and (out / RECORD_FILE).is_file()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out, or pass --overwrite "
                              "to replace a patch ConvNet directory (no other directory is replaced)")
    pairs, skipped = pair_annotation_files(args.images, args.annotations)
    if not pairs:
        raise ValueError(f"no image in {args.images} has an annotation file in {args.annotations or args.images}")
    dataset = build_patch_dataset(pairs, sampling, scale=config.scale, convention=args.coordinates,
                                  outside="drop" if args.drop_outside_points else "error", seed=config.seed)
    dataset.skipped = skipped + dataset.skipped
    log.info("%d patches (%d tumour) from %d images", len(dataset.labels), int(dataset.labels.sum()),
             len(set(dataset.image_ids)))
    model = train_patch_cnn(dataset, config, verbose=0 if args.quiet else 2)
    model.record["sampling"] = vars(sampling)
    model.save(out)
    return report(model, out)


def report(model, out: Path) -> str:
    """Split sizes, accuracies, conventions, skips; and the heatmap command."""
    lines = [f"patch ConvNet saved to {out} ({model.network.count_params():,} parameters)"]
    for name in ("train", "val", "test"):
        m = model.record["metrics"][name]
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
        lines.append(f"  {name:5s}: {m['images']} images, {m['patches']} patches ({m['tumour_patches']} tumour), "
                     f"patch accuracy {acc}")
    conventions = model.record.get("conventions", {})
    for kind in sorted(set(conventions.values())):
        lines.append(f"  coordinates read as {kind}: {sum(v == kind for v in conventions.values())} files")
    dropped = model.record.get("dropped_points", [])
    if dropped:
        lines.append(f"  {len(dropped)} points outside their image dropped (listed in {out}/patch_cnn.json)")
    skipped = model.record.get("skipped", [])
    if skipped:
        lines.append(f"  {len(skipped)} skipped:")
        lines += [f"    {s['image']}: {s['reason']}" for s in skipped]
    lines.append(f"heatmap: python -m pipeline.heatmap --model {out} IMAGE --out heatmaps/")
    return "\n".join(lines)


#: Library parameters under another option name here.
FLAGS = {"convention": "--coordinates", "outside='drop'": "--drop-outside-points"}


def main(argv=None) -> int:
    """Run a subcommand; returns 0, or 2 with a message on bad input."""
    return run(build_parser(), command, argv, flags=FLAGS)


def command(args) -> int:
    """``synthetic`` or ``train``; prints what was written."""
    if args.command == "synthetic":
        from classifiers.patch_cnn.annotations import write_synthetic_annotated

        out = write_synthetic_annotated(args.out, args.images, tuple(args.size), args.seed)
        print(f"wrote {args.images} images to {out / 'images'} and annotations to {out / 'groundTruth'}")
        return 0
    print(train(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
