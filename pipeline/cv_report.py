"""Cross-validated report of the classifiers on one or more feature stores.

Usage::

    python -m pipeline.cv_report [--features STORE_DIR [STORE_DIR ...]] [--data DIR_OR_CSV] \\
        --out REPORT_DIR [--labels auto|classes|bach4|bmc3|binary|breakhis2|breakhis8|MAPPING.json] \\
        [--regroup MAPPING.json] [--magnification 40 ...] [--folds 6] \\
        [--classifier xgboost|logreg|mil|two_stage] [--seed S] [--fusion concat|mean-proba] \\
        [--n-jobs 2] [--device auto|cpu|cuda] \\
        [--two-stage-preset paper|cpu|finetune] [--two-stage-config JSON] [--two-stage-stain none|auto|IMAGE]

``--classifier`` and ``--fusion`` may be repeated or comma-separated; by default
both feature classifiers run on ``--features``, and the two-stage CNN on ``--data``
(:mod:`classifiers.two_stage.cv`; its per-fold models and checkpoints go to
``REPORT_DIR/two_stage_folds``).  This module only parses arguments, builds the configs,
calls the library and writes the report (see :mod:`classifiers.evaluation.report` for the files).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from pipeline._common import cli_message, run  # first: sets passive OpenMP waiting before XGBoost loads
from pipeline._common import add_data_options, add_labels_option, load_data, print_last
from classifiers import CLASSIFIER_NAMES, DEFAULT_CLASSIFIERS, FUSION_CHOICES, CVConfig, InputDataError, build_dataset, run_cross_validation
from classifiers.evaluation.methods import command_line
from classifiers.feature.estimators import CV_CLASSIFIER_NAMES, DEVICE_CHOICES, DeviceUnavailableError
from classifiers.feature.presets import PRESET_NAMES, get_preset

logger = logging.getLogger("pipeline.cv_report")
TWO_STAGE = "two_stage"
ALL_CLASSIFIERS = CV_CLASSIFIER_NAMES + (TWO_STAGE,)
TWO_STAGE_PRESETS = ("paper", "cpu", "finetune")  # classifiers.two_stage.cv.PRESETS (not imported: TensorFlow)


def _choices_list(allowed):
    """argparse type: comma-separated names, each in ``allowed``."""

    def parse(text: str) -> list:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r}; choose from {', '.join(allowed)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.cv_report",
        description="Grouped K-fold cross-validation with per-image voting on CNN feature stores; "
        "writes metrics.json, predictions.csv, tables, pictures and report.html.",
    )
    parser.add_argument("--features", nargs="+", metavar="STORE_DIR",
                        help="feature store directories (several = several backbones of the same images)")
    parser.add_argument("--data", metavar="DIR_OR_CSV",
                        help="image folder or manifest for --classifier two_stage (with --features: the "
                        "same images, which then share one fold assignment)")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR",
                        help="directory for the report files; written into a temporary directory and "
                        "swapped in at the end, so a failed run leaves the previous report untouched")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing report at --out (never any other non-empty directory)")
    add_labels_option(parser)
    add_data_options(parser, stores=True)
    parser.add_argument("--folds", type=int, default=6, help="number of grouped folds (default 6)")
    parser.add_argument("--classifier", action="append", type=_choices_list(ALL_CLASSIFIERS),
                        help="xgboost, logreg, logreg-sqrt (logreg after a signed square root of every feature), "
                        "xgboost-es and lightgbm (boosting rounds chosen by early stopping on a grouped inner split; "
                        "lightgbm needs pip install lightgbm), mil (attention pooling of the instances of a store extracted with --instances: "
                        "docs/accuracy.md), two_stage (repeat or comma-separate; default xgboost and logreg "
                        "with --features, two_stage with --data)")
    parser.add_argument("--fusion", action="append", type=_choices_list(FUSION_CHOICES),
                        help="with several stores: concat, mean-proba or both (default both)")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and classifiers (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="repeat the CV with each fold seed: one report per seed in REPORT_DIR/seed-S "
                        "and ensemble.csv / ensemble.md over all runs (mean +- sd over seeds and folds)")
    parser.add_argument("--tune", action="store_true",
                        help="choose each classifier's hyper-parameters by an inner grouped 3-fold CV of "
                        "the training folds (XGBoost depth/rounds/column sampling, logreg C; xgboost-es, "
                        "lightgbm and mil choose their length by early stopping either way, and --tune reports "
                        "it); the choice per fold goes to tuning.csv")
    parser.add_argument("--preset", choices=PRESET_NAMES,
                        help="a documented best configuration: its classifier, fusion and tuning (see "
                        "docs/accuracy.md); --features may then be the store root pipeline.extract --preset wrote")
    parser.add_argument("--n-jobs", type=int, default=2, help="XGBoost and LightGBM threads (default 2)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="XGBoost device: auto (GPU if usable, else CPU), cpu, or cuda (fail without GPU)")
    two = parser.add_argument_group("two-stage CNN (--classifier two_stage)")
    two.add_argument("--two-stage-preset", default="paper", choices=TWO_STAGE_PRESETS,
                     help="starting config: paper (Nazeri et al.: 512-px patches at full resolution, 30+30 "
                     "epochs), cpu (scale 0.25, 128-px patches, half the patch-wise width, 25 epochs) or finetune "
                     "(ImageNet EfficientNet-Lite0 fine-tuned as the patch-wise network, scale 0.5, 384-px patches; "
                     "meant for a GPU): see docs/two-stage.md")
    two.add_argument("--two-stage-config", metavar="JSON",
                     help="TwoStageConfig fields overriding the preset: a JSON file or an inline JSON "
                     "object, e.g. '{\"epochs\": 5}' (scheme, seed and stain come from --labels, --seed, "
                     "--two-stage-stain)")
    two.add_argument("--two-stage-stain", default="none", metavar="none|auto|IMAGE",
                     help="Macenko normalisation: none (default; the paper relies on colour augmentation), "
                     "auto (reference fitted inside each training fold) or a reference image")
    two.add_argument("--two-stage-keep-checkpoints", action="store_true",
                     help="keep every fold's epoch checkpoints after its model is saved")
    two.add_argument("--progress", action="store_true", help="progress bars over training batches")
    return parser


def _flatten(values, default) -> tuple:
    if not values:
        return tuple(default)
    return tuple(dict.fromkeys(name for group in values for name in group))  # keep order, drop repeats


def selected_classifiers(args: argparse.Namespace) -> tuple:
    """``--classifier`` names, or the defaults for the inputs given."""
    default = (DEFAULT_CLASSIFIERS if args.features else ()) + ((TWO_STAGE,) if args.data else ())
    return _flatten(args.classifier, default)


def config_from_args(args: argparse.Namespace) -> CVConfig:
    """Build the :class:`CVConfig` of the feature classifiers from parsed arguments.

    With ``--preset``, its classifier, fusion and tuning apply unless given explicitly.
    """
    preset = get_preset(args.preset) if args.preset else None
    classifiers = tuple(c for c in selected_classifiers(args) if c != TWO_STAGE)
    if preset and not args.classifier:
        classifiers = (preset.classifier,)
    return CVConfig(
        scheme=args.labels,
        n_folds=args.folds,
        classifiers=classifiers,
        fusion=_flatten(args.fusion, (preset.fusion,) if preset else FUSION_CHOICES),
        seed=args.seed,
        n_jobs=args.n_jobs,
        device=args.device,
        tune=args.tune or bool(preset and preset.tune),
    )


def two_stage_overrides(text: str | None) -> dict:
    """``--two-stage-config``: a JSON file, or an inline JSON object."""
    if not text:
        return {}
    source = text if text.lstrip().startswith("{") else Path(text).read_text(encoding="utf-8")
    record = json.loads(source)
    if not isinstance(record, dict):
        raise ValueError("--two-stage-config must be a JSON object of TwoStageConfig fields")
    return record


def _check_inputs(parser, args, classifiers) -> None:
    if TWO_STAGE in classifiers and not args.data:
        parser.error("--classifier two_stage needs the images: --data DIR_OR_CSV")
    if TWO_STAGE not in classifiers and args.data:
        parser.error("--data is used by --classifier two_stage only; add it or drop --data")
    if any(c != TWO_STAGE for c in classifiers) and not args.features:
        parser.error("xgboost and logreg need --features STORE_DIR")
    if args.features and all(c == TWO_STAGE for c in classifiers):
        parser.error("--features given but no feature classifier selected (xgboost, logreg)")
    if not args.features and not args.data:
        parser.error("give --features STORE_DIR (deep-feature classifiers) and/or --data DIR_OR_CSV (two_stage)")
    if args.seeds and TWO_STAGE in classifiers:
        parser.error("--seeds repeats the feature classifiers only; run two_stage with --seed")
    if args.preset and TWO_STAGE in classifiers:
        parser.error("--preset configures the feature classifiers; drop --classifier two_stage")


def _number(value) -> float:
    return float("nan") if value is None else value  # JSON null = undefined


def main(argv=None) -> dict:
    """Run the report; returns ``{"summary": ..., "files": [...]}``.

    Input errors (bad stores, infeasible folds, impossible label mapping) exit
    with status 2 and a message saying what to do.
    """
    parser = build_parser()
    command = command_line("pipeline.cv_report", sys.argv[1:] if argv is None else argv)
    return run(parser, partial(report, parser, command=command), argv, errors=(DeviceUnavailableError,),
               interrupted=_interrupted, exit_on_error=True, timestamps=True, flags=FLAGS)


#: Library parameters under another option name here.
FLAGS = {"stain_reference": "--two-stage-stain", "two_stage": "--two-stage-config"}


def _interrupted(args) -> str:
    return (f"interrupted; rerun the same command to resume (finished two-stage folds and epochs are kept "
            f"under {Path(args.out) / 'two_stage_folds'})")


def report(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str | None = None) -> dict:
    """Cross-validate what the options select and write the report directory; ``command`` is
    the command line the report's Methods state.  Ends by printing where report.html is."""
    classifiers = selected_classifiers(args)
    _check_inputs(parser, args, classifiers)
    config = config_from_args(args)
    try:
        # With two_stage alone, the feature classifiers' list is empty: check the rest anyway.
        (config if config.classifiers else replace(config, classifiers=CLASSIFIER_NAMES[:1])).validate()
    except ValueError as exc:
        parser.error(cli_message(parser, str(exc), FLAGS))

    from features.store import load_store  # imported late: only the CLI needs the store format
    from classifiers.feature.presets import select_stores
    from classifiers.evaluation.report import write_report
    from classifiers.evaluation.report_dir import check_report_out, write_report_dir

    check_report_out(args.out, args.overwrite)  # before any work
    paths = args.features or ()
    if args.preset:
        paths = select_stores(get_preset(args.preset), paths)
        logger.info("preset %s: stores %s", args.preset, ", ".join(map(str, paths)))
    tables = [load_store(path) for path in paths]
    if TWO_STAGE in classifiers:
        result = _two_stage(args, config, tables)
    elif args.seeds:
        return _repeated(_dataset(args, tables, config), config, args.seeds, args.out, command)
    else:
        dataset = _dataset(args, tables, config)
        result = run_cross_validation(dataset, config)
    written = write_report_dir(args.out, lambda tmp: write_report(result, tmp, command=command))
    for name, run_ in written["summary"]["runs"].items():
        maj, ci = run_["majority"], run_["ci95"]["accuracy_majority"]
        logger.info(
            "%s: accuracy %.3f (majority; 95%% CI %.3f-%.3f), %.3f (mean proba); folds %.3f +- %.3f; macro AUC %.3f",
            name, maj["accuracy"], _number(ci[0]), _number(ci[1]), run_["mean_proba"]["accuracy"],
            maj["fold_accuracy_mean"], _number(maj["fold_accuracy_sd"]), _number(run_["roc_auc"]["macro"]),
        )
    logger.info("report written to %s (%d files)", args.out, len(written["files"]))
    print_last(f"report: {(Path(args.out) / 'report.html').resolve()}")
    return written


def _dataset(args, tables, config: CVConfig):
    """The stores as one data set in ``--labels``, with ``--regroup`` and ``--magnification``."""
    dataset = build_dataset(tables, config.scheme, regroup=args.regroup, magnification=args.magnification,
                            breakhis_patients=args.breakhis_patients)
    logger.info("%d images, classes %s (%s)%s", len(dataset.images), ", ".join(dataset.classes),
                dataset.label_scheme.describe(),
                "; also read as " + ", ".join(g.name for g in dataset.groupings) if dataset.groupings else "")
    for ids in dataset.duplicates:
        logger.warning("same image content, kept in one group: %s", " = ".join(ids))
    return dataset


def _repeated(dataset, config: CVConfig, seeds, out, command: str | None = None) -> dict:
    """One report per fold seed under ``out/seed-S`` and the table over seeds in ``out``."""
    from classifiers.evaluation.repeated import write_repeated_report
    from classifiers.evaluation.report_dir import write_report_dir

    written = write_report_dir(out, lambda tmp: write_repeated_report(dataset, config, seeds, tmp, command))
    print(written["markdown"], end="")
    logger.info("report written to %s (%d files)", out, len(written["files"]))
    out = Path(out).resolve()
    print_last(f"table over seeds: {out / 'ensemble.md'}\nreports: "
               + ", ".join(str(out / f"seed-{s}" / "report.html") for s in seeds))
    return written


def _two_stage(args, config: CVConfig, tables):
    """Cross-validate the two-stage CNN (and the feature classifiers on `tables`) on shared folds."""
    from classifiers.api import cross_validate_two_stage

    data = load_data(args, scheme=config.scheme)
    if args.breakhis_patients:  # the stores' groups as the data's
        from classifiers.evaluation.cv_dataset import with_breakhis_patients

        tables = [with_breakhis_patients(t, args.breakhis_patients) for t in tables]
    try:
        overrides = two_stage_overrides(args.two_stage_config)
    except ValueError as exc:  # bad JSON
        raise InputDataError(f"--two-stage-config: {exc}") from None
    return cross_validate_two_stage(data, tables, config, Path(args.out) / "two_stage_folds",
                                    preset=args.two_stage_preset, overrides=overrides,
                                    stain_reference=args.two_stage_stain,
                                    keep_checkpoints=args.two_stage_keep_checkpoints, progress=args.progress)

if __name__ == "__main__":
    main()
