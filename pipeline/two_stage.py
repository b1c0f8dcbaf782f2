"""``python -m pipeline.two_stage``: train and apply the two-stage CNN (Nazeri et al. 2018).

::

    python -m pipeline.two_stage train --data DIR_OR_CSV --out MODEL_DIR [options]
    python -m pipeline.two_stage train ... --patch-network efficientnet_lite0   # fine-tune ImageNet (GPU)
    python -m pipeline.two_stage train ... --preset finetune   # as cv_report --two-stage-preset finetune
    python -m pipeline.two_stage predict --model MODEL_DIR IMAGE_OR_DIR ... [--out predictions.csv]

Training checkpoints every finished epoch under ``MODEL_DIR/checkpoints``; rerunning the same
command after an interruption resumes from the last finished epoch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from classifiers.two_stage.model import METHODS, PATCH_NETWORKS, TwoStageConfig
from classifiers.two_stage.cv import PRESETS, preset_config
from pipeline._common import (LABELS_HELP, HelpFormatter, add_data_options, add_training_options, labels_spec,
                              load_data, run, training_config)

log = logging.getLogger("pipeline.two_stage")


def build_parser() -> argparse.ArgumentParser:
    d = TwoStageConfig
    p = argparse.ArgumentParser(prog="python -m pipeline.two_stage",
                                description="Two-stage CNN (Nazeri et al. 2018), trained from scratch or "
                                "fine-tuning an ImageNet patch-wise network.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = HelpFormatter

    t = sub.add_parser("train", formatter_class=fmt, help="train both networks and save the model",
                       description="Train the patch-wise, then the image-wise network; checkpoints "
                       "go to OUT/checkpoints and a rerun resumes from the last finished epoch.")
    t.add_argument("--data", required=True, help="folder of class folders, CSV manifest path,label[,group], "
                   "the BreakHis folder or BACH as distributed (docs/data-sets.md)")
    t.add_argument("--out", required=True, type=Path, help="model directory")
    t.add_argument("--preset", choices=tuple(PRESETS),
                   help="start from a named configuration, as cv_report --two-stage-preset takes it (paper, "
                   "cpu, finetune: docs/two-stage.md); options given with values other than their defaults "
                   "override it, so the final model can be trained as the cross-validated ones were")
    t.add_argument("--scheme", "--labels", dest="scheme", default="auto", type=labels_spec,
                   metavar="SCHEME_OR_MAPPING", help=LABELS_HELP + "; the networks have one output per class")
    add_data_options(t)
    t.add_argument("--patch-size", type=int, default=d.patch_size, help="patch side k (multiple of 32)")
    t.add_argument("--stride", type=int, default=d.stride, help="patch stride for the patch-wise network")
    t.add_argument("--channels", type=int, default=d.channels, help="maps per patch (C)")
    t.add_argument("--width", type=int, default=d.patch_width, help="first-block channels, patch-wise network")
    t.add_argument("--image-width", type=int, default=d.image_width, help="first-block channels, image-wise network")
    t.add_argument("--head", default=d.patch_head, choices=("flatten", "gap"),
                   help="patch-wise training head: the authors' flatten + dense, or global average "
                   "pooling + dense")
    t.add_argument("--patch-network", default=d.patch_network, choices=PATCH_NETWORKS,
                   help="patch-wise network: nazeri (the paper's, from scratch) or an ImageNet "
                   "EfficientNet-Lite fine-tuned in its place (meant for a GPU; patch size a multiple of "
                   "128; docs/two-stage.md gives the settings of cv_report's finetune preset)")
    t.add_argument("--patch-weights", default=d.patch_weights,
                   help="starting weights of a pretrained patch-wise network: imagenet, a weights file, "
                   "or none (random)")
    add_training_options(t, d, epochs_help="patch-wise epochs", batch_help="mini-batch size",
                         val_help="training images held out for validation and early stopping (0: none)",
                         seed_help="root of all random draws", quiet_help="no progress bars")
    t.add_argument("--image-epochs", type=int, default=d.image_epochs, help="maximum image-wise epochs")
    t.add_argument("--image-lr", type=float, default=d.image_learning_rate,
                   help="starting learning rate of the image-wise network (default: --lr's; give 1e-3 "
                   "with a fine-tuned --patch-network, whose --lr is low)")
    t.add_argument("--lr-decay", type=float, default=d.lr_decay, help="learning-rate factor per step")
    t.add_argument("--lr-decay-every", type=int, default=d.lr_decay_every, help="epochs per step")
    t.add_argument("--patch-copies", type=int, default=d.patch_copies,
                   help="augmented copies of each patch per epoch (16: 8 rotations/flips x plain/colour)")
    t.add_argument("--image-copies", type=int, default=d.image_copies,
                   help="augmented views of each image for the image-wise network")
    t.add_argument("--color-jitter", type=float, default=d.color_jitter,
                   help="saturation/contrast/brightness factors in U(1-x, 1+x)")
    t.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience (image-wise)")
    t.add_argument("--stain-reference", default="none",
                   help="Macenko reference image, 'auto' (most typical dataset image) or 'none'")
    t.add_argument("--cache-mb", type=float, default=d.cache_mb, help="memory for decoded training images")

    r = sub.add_parser("predict", formatter_class=fmt, help="classify images with a trained model")
    r.add_argument("--model", required=True, type=Path, help="model directory written by 'train'")
    r.add_argument("images", nargs="+", help="image files, folders (searched recursively) or CSV manifests")
    r.add_argument("--out", type=Path, help="write the predictions to this CSV file")
    r.add_argument("--method", default="two_stage", choices=METHODS + ("all",),
                   help="two networks jointly, or a patch-fusion baseline on the patch-wise network")
    r.add_argument("--no-ensemble", action="store_true", help="single pass instead of 8 rotations/flips")
    return p


def train(args) -> int:
    from classifiers.two_stage.model import TwoStageModel
    from data.mapping import resolve_scheme

    dataset = load_data(args, scheme=args.scheme)
    scheme = resolve_scheme(args.scheme, dataset["label"])
    args.scheme = scheme.name if scheme.builtin else scheme.to_dict()
    config = config_from_args(args)  # a bad option fails before the stain reference is fitted
    if args.stain_reference.lower() != "none":
        from features.stain import fit_stain_reference

        reference = None if args.stain_reference.lower() == "auto" else args.stain_reference
        config = replace(config, stain=fit_stain_reference(dataset, config.scale, reference))
    log.info("training on %d images (%s: %s) into %s", len(dataset), scheme.name, ", ".join(scheme.classes), args.out)
    model = TwoStageModel(config)
    model.fit(dataset, checkpoint_dir=args.out / "checkpoints", progress=not args.quiet)
    model.save(args.out)
    print(train_report(model, args.out))
    return 0


def _option_fields(args) -> dict:
    """The :class:`TwoStageConfig` fields the ``train`` options set (all but scheme and stain)."""
    weights = None if str(args.patch_weights).lower() == "none" else args.patch_weights
    return dict(
        **training_config(args), patch_size=args.patch_size, stride=args.stride,
        channels=args.channels, patch_width=args.width, image_width=args.image_width,
        patch_head=args.head, image_epochs=args.image_epochs, lr_decay=args.lr_decay,
        lr_decay_every=args.lr_decay_every, patch_copies=args.patch_copies,
        image_copies=args.image_copies, color_jitter=args.color_jitter,
        patience=args.patience, cache_mb=args.cache_mb,
        patch_network=args.patch_network, patch_weights=weights, image_learning_rate=args.image_lr,
    )


def config_from_args(args) -> TwoStageConfig:
    """The :class:`TwoStageConfig` of parsed ``train`` options (``args.scheme`` resolved): the
    options, or with ``--preset`` the preset overridden by the options that differ from their
    defaults."""
    fields = _option_fields(args)
    if args.preset is None:
        return TwoStageConfig(**fields, scheme=args.scheme)
    defaults = _option_fields(build_parser().parse_args(["train", "--data", "-", "--out", "-"]))
    given = {k: v for k, v in fields.items() if v != defaults[k] and k != "seed"}
    return preset_config(args.preset, given, scheme=args.scheme, seed=args.seed)


def train_report(model, out: Path) -> str:
    """End-of-training summary: grid, epochs run, last and best validation accuracy."""
    lines = [f"model saved to {out} (patch grid {model.grid_[0]}x{model.grid_[1]}, "
             f"classes {', '.join(model.classes_)})"]
    for stage in ("patch", "image"):
        history = model.history_[stage]
        last = history[-1]
        text = f"{stage}-wise network: {len(history)} epochs, last loss {last['loss']:.4f}"
        if last["val_accuracy"] is not None:
            best = max(h["val_accuracy"] for h in history)
            text += f", val accuracy last {last['val_accuracy']:.3f} / best {best:.3f}"
        lines.append(text)
    return "\n".join(lines)


def predict(args) -> int:
    from classifiers.two_stage.model import TwoStageModel, collect_images, predict_table

    model = TwoStageModel.load(args.model)
    images = collect_images(args.images)
    methods = METHODS if args.method == "all" else (args.method,)
    table, skipped = predict_table(model, images, methods, ensemble=False if args.no_ensemble else None)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    if len(table):
        shown = ["path", *methods] + (["label"] if (table["label"] != "").any() else [])
        print(table[shown].to_string(index=False))
        labelled = table[table["label"] != ""]
        for m in methods:
            if len(labelled):
                print(f"{m} accuracy on {len(labelled)} labelled image(s): "
                      f"{(labelled[m] == labelled['label']).mean():.3f}")
    for item in skipped:
        print(f"skipped: {item['path']}: {item['reason']}", file=sys.stderr)
    if args.out is not None:
        print(f"predictions written to {args.out}")
    return 0 if not skipped else 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv, interrupted=_interrupted)


def command(args) -> int:
    return train(args) if args.command == "train" else predict(args)


def _interrupted(args) -> str | None:
    if args.command != "train":
        return None
    return (f"interrupted; rerun the same command to resume from the last finished epoch "
            f"(checkpoints in {args.out / 'checkpoints'})")


if __name__ == "__main__":
    sys.exit(main())
