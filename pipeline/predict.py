"""``python -m pipeline.predict``: classify new images with a model directory.

::

    python -m pipeline.predict --model MODEL_DIR IMAGE_OR_DIR [IMAGE_OR_DIR ...] \\
        --out PREDICTIONS_CSV [--weights BACKBONE=FILE] [--batch-size 8] [--map MAPPING.json]
        [--min-confidence 0.5]
    python -m pipeline.predict --model MODEL_DIR --data DIR_OR_CSV [--map MAPPING.json] \\
        [--magnification 40 ...]     # labelled input: accuracy in predictions-accuracy.csv

MODEL_DIR is any model directory (:func:`classifiers.load_model` reads its kind).  A
deep-feature model processes each image with its own extraction config (stain normalisation,
every colour augmentation and crop) and decides by majority voting over the augmentations, as
in cross-validation; a two-stage model votes over its 8 rotations/flips, a patch ConvNet over
its 32-pixel windows.  Unreadable images are skipped, logged with their reason and listed at
the end; ``predictions.csv`` gets one row per predicted image, the same columns for every kind
(:class:`classifiers.predictions.PredictionResult`).
A deep-feature model adds ``prediction_<level>`` for every grouping it records (a bach4
model: bmc3, binary) and for ``--map``; ``--data`` gives labelled input and the accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline._common import add_data_options, add_weights_option, HelpFormatter, load_data, mapping_file, run

log = logging.getLogger("pipeline.predict")
PROG = "python -m pipeline.predict"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Predict images (files or folders, searched recursively) with a model directory "
        "made by python -m pipeline.train; writes class, mean probabilities and votes per image.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--data", metavar="DIR_OR_CSV",
                   help="a labelled data set instead of IMAGE_OR_DIR (class folders, a manifest, BreakHis, BACH's "
                   "layout): its labels give the accuracy, written to OUT-accuracy.csv (image- and "
                   "patient-level, per magnification, at every level the labels can be read in)")
    p.add_argument("--map", type=mapping_file, metavar="MAPPING.json",
                   help="also read the predictions through this mapping file, from the model's classes or "
                   "one of its groupings (e.g. {\"benign\": [\"non-carcinoma\"], \"malignant\": [\"carcinoma\"]} "
                   "for a BACH model on BreakHis): column prediction_<mapping name>")
    add_data_options(p)
    p.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="model directory: pipeline.train --out, or a two-stage model (pipeline.two_stage train --out)")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="CSV file to write, e.g. runs/new/predictions.csv (required: nothing is written "
                   "into the current folder unasked)")
    add_weights_option(p, "use this weights file for a backbone (it must have the sha256 the model records)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="crops per forward pass (default: the model's, which reproduces its features "
                   "bit for bit)")
    p.add_argument("--min-confidence", type=float, default=0.5, metavar="P",
                   help="flag an image as low confidence when its highest mean probability is below P, or "
                   "when majority voting and mean-probability voting disagree (column low_confidence; "
                   "LOW CONFIDENCE in the printed line)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """Predict and write the CSV; returns 0, or 2 with a message on bad input."""
    return run(build_parser(), predict, argv)


def predict(args) -> int:
    """Predict every image of the inputs with the model's own path and write the CSV."""
    from classifiers.predictions import check_predictions_out
    from classifiers.protocol import load_model
    from data.mapping import load_mapping

    if bool(args.images) == bool(args.data):
        raise ValueError("give either images (files or folders) or --data with a labelled data set")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise ValueError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    check_predictions_out(args.out)  # before any work
    mapping = load_mapping(args.map) if args.map else None
    model = load_model(args.model)
    failure = "could be read" if model.kind == "features" else "could be read and used"
    options = dict(weights=dict(args.weights), batch_size=args.batch_size, progress=not args.quiet)
    if model.kind != "features":
        if args.data or mapping is not None:
            raise ValueError("--data and --map are for deep-feature models (pipeline.train) in this version")
        result = model.predict_images(args.images, **options)
        return _write(result, result.skipped, result.n_images, args.out, failure, args.min_confidence)
    model.check_mapping(mapping)  # a mapping that does not fit fails before any work
    if args.data:
        data = load_data(args)
        result, accuracy = model.predict_dataset(data, mapping=mapping, **options)
        status = _write(result, result.skipped, len(data), args.out, failure, args.min_confidence)
        if status == 0:
            _write_accuracy(accuracy, args.out)
        return status
    result = model.predict_images(args.images, mapping=mapping, **options)
    return _write(result, result.skipped, result.n_images, args.out, failure, args.min_confidence)


def accuracy_path(out) -> str:
    """Where the accuracy of a labelled prediction goes: ``predictions.csv`` -> ``predictions-accuracy.csv``."""
    root, ext = os.path.splitext(out)
    return f"{root}-accuracy{ext or '.csv'}"


def _write_accuracy(accuracy, out) -> None:
    from data.files import atomic_write

    path = accuracy_path(out)
    atomic_write(path, lambda tmp: accuracy.to_csv(tmp, index=False))
    if accuracy.empty:
        print(f"no accuracy: the labels are not classes of the model or of its groupings (give --map); "
              f"empty {path}")
        return
    print("accuracy (image level; patient level = mean over patients of each patient's accuracy):")
    print(accuracy.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"written to {path}")


def _write(result, skipped, n_inputs: int, out, failure: str, min_confidence: float = 0.5) -> int:
    if result.table.empty:
        print(f"{PROG}: error: none of the {n_inputs} images {failure}:", file=sys.stderr)
        for item in skipped:
            print(f"  {item['image']}: {item['reason']}", file=sys.stderr)
        return 2
    from classifiers.predictions import flag_low_confidence, write_predictions

    flag_low_confidence(result.table, result.classes, min_confidence)
    write_predictions(result, out)
    print(report(result, skipped, out))
    return 0


def report(result, skipped, out) -> str:
    """The per-image decisions, then what was skipped and why."""
    classes = result.classes
    lines = []
    for r in result.table.to_dict("records"):  # not itertuples: "proba_non-carcinoma" is no identifier
        votes = " ".join(f"{c} {r[f'votes_{c}']}" for c in classes)
        probas = " ".join(f"{c} {r[f'proba_{c}']:.3f}" for c in classes)
        note = f" [not stain-normalised: {r['stain_note']}]" if r["stain_note"] else ""
        if r["low_confidence"]:
            why = (f"highest mean probability {r['confidence']:.3f}" if r["prediction"] == r["prediction_mean_proba"]
                   else f"votes say {r['prediction']}, mean probability says {r['prediction_mean_proba']}")
            note = f" [LOW CONFIDENCE: {why}]" + note
        levels = ", ".join(f"{c[len('prediction_'):]}: {r[c]}" for c in r
                           if c.startswith("prediction_") and c != "prediction_mean_proba")
        levels = f" [{levels}]" if levels else ""
        truth = f" [truth: {r['truth']}]" if "truth" in r else ""
        lines.append(f"{r['image']}: {r['prediction']} (votes: {votes}; mean proba: {probas}){levels}{note}{truth}")
    lines.append(f"{len(result.table)} images predicted in {result.seconds:.1f} s on {result.device}; "
                 f"{int(result.table['low_confidence'].sum())} flagged low confidence; written to {out}")
    if skipped:
        lines.append(f"{len(skipped)} skipped:")
        lines += [f"  {s['image']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


if __name__ == "__main__":
    # Keras imports IPython when it is installed (0.6 s here) only to detect a notebook, which a
    # command-line run never is; None in sys.modules makes that optional import fail at once.
    sys.modules.setdefault("IPython", None)
    sys.exit(main())
