"""Cross-validated report of the classifiers on one or more feature stores.

Usage::

    python -m pipeline.cv_report --features STORE_DIR [STORE_DIR ...] --out REPORT_DIR \\
        [--labels bach4|bmc3|binary] [--folds 6] [--classifier xgboost|logreg] [--seed S] \\
        [--fusion concat|mean-proba] [--n-jobs 2] [--device auto|cpu|cuda]

``--classifier`` and ``--fusion`` may be repeated or comma-separated; by default
both classifiers run, and with several stores both fusions.  This module only
parses arguments, builds a :class:`classifiers.CVConfig`, calls the library
and writes the report (see :mod:`classifiers.report` for the files).
"""

from __future__ import annotations

import argparse
import logging
import os

# XGBoost's OpenMP threads busy-wait by default; on a machine whose cores are shared with
# other jobs a 2-thread fit then runs ~100x slower (measured: 0.15 s -> 8-19 s for a small
# fit).  Passive waiting must be set before the OpenMP runtime loads, i.e. before
# scikit-learn / XGBoost are imported; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from classifiers import CLASSIFIER_NAMES, FUSION_CHOICES, CVConfig, InputDataError, build_dataset, run_cross_validation
from classifiers.models import DEVICE_CHOICES, DeviceUnavailableError

logger = logging.getLogger("pipeline.cv_report")
SCHEME_CHOICES = ("bach4", "bmc3", "binary")


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
    parser.add_argument("--features", nargs="+", required=True, metavar="STORE_DIR",
                        help="feature store directories (several = several backbones of the same images)")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory for the report files")
    parser.add_argument("--labels", default="bach4", choices=SCHEME_CHOICES,
                        help="label scheme to report in (default bach4); bach4 stores map to bmc3/binary")
    parser.add_argument("--folds", type=int, default=6, help="number of grouped folds (default 6)")
    parser.add_argument("--classifier", action="append", type=_choices_list(CLASSIFIER_NAMES),
                        help="xgboost, logreg or both (repeat or comma-separate; default both)")
    parser.add_argument("--fusion", action="append", type=_choices_list(FUSION_CHOICES),
                        help="with several stores: concat, mean-proba or both (default both)")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and classifiers (default 0)")
    parser.add_argument("--n-jobs", type=int, default=2, help="XGBoost threads (default 2)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="XGBoost device: auto (GPU if usable, else CPU), cpu, or cuda (fail without GPU)")
    return parser


def _flatten(values, default) -> tuple:
    if not values:
        return tuple(default)
    return tuple(dict.fromkeys(name for group in values for name in group))  # keep order, drop repeats


def config_from_args(args: argparse.Namespace) -> CVConfig:
    """Build the :class:`CVConfig` from parsed arguments."""
    return CVConfig(
        scheme=args.labels,
        n_folds=args.folds,
        classifiers=_flatten(args.classifier, CLASSIFIER_NAMES),
        fusion=_flatten(args.fusion, FUSION_CHOICES),
        seed=args.seed,
        n_jobs=args.n_jobs,
        device=args.device,
    )


def _number(value) -> float:
    return float("nan") if value is None else value  # JSON null = undefined


def main(argv=None) -> dict:
    """Run the report; returns ``{"summary": ..., "files": [...]}``.

    Input errors (bad stores, infeasible folds, impossible label mapping) exit
    with status 2 and a message saying what to do.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))

    from features.store import StoreError, load_store  # imported late: only the CLI needs the store format
    from classifiers.report import write_report

    try:
        tables = [load_store(path) for path in args.features]
        dataset = build_dataset(tables, config.scheme)
        result = run_cross_validation(dataset, config)
    except (InputDataError, StoreError, DeviceUnavailableError, FileNotFoundError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    written = write_report(result, args.out)
    for name, run in written["summary"]["runs"].items():
        maj = run["majority"]
        logger.info(
            "%s: accuracy %.3f (majority), %.3f (mean proba); folds %.3f +- %.3f; macro AUC %.3f",
            name, maj["accuracy"], run["mean_proba"]["accuracy"], maj["fold_accuracy_mean"],
            _number(maj["fold_accuracy_sd"]), _number(run["roc_auc"]["macro"]),
        )
    logger.info("report written to %s (%d files)", args.out, len(written["files"]))
    return written


if __name__ == "__main__":
    main()
