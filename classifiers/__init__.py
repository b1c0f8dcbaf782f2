"""Classifiers, cross-validation, voting, metrics and reports on CNN feature stores.

Typical use (what ``python -m pipeline.cv_report`` does)::

    from features.store import load_store
    from classifiers import CVConfig, build_dataset, run_cross_validation
    from classifiers.evaluation.report import write_report

    tables = [load_store(d) for d in store_dirs]
    config = CVConfig(scheme="bmc3", n_folds=6, seed=0)
    result = run_cross_validation(build_dataset(tables, config.scheme), config)
    write_report(result, "runs/report")

Modules: :mod:`~classifiers.feature.estimators` (estimators, XGBoost device choice),
:mod:`~classifiers.evaluation.cv_dataset` (store validation, alignment, label schemes),
:mod:`~classifiers.evaluation.folds` (grouped stratified folds),
:mod:`~classifiers.evaluation.voting` (per-image voting),
:mod:`~classifiers.evaluation.cross_validation` (cross-validation, fusion, final fit),
:mod:`~classifiers.evaluation.metrics` and :mod:`~classifiers.evaluation.report`.
"""

# Registers the two_stage backbone with features.backbones (the classifier owns its files).
from classifiers.two_stage import backbone as _two_stage_backbone  # noqa: F401
from classifiers.evaluation.cv_dataset import CVDataset, InputDataError, build_dataset
from classifiers.evaluation.cross_validation import (
    FUSION_CHOICES,
    CVConfig,
    CVResult,
    FittedModel,
    RunSpec,
    fit_run_model,
    plan_runs,
    run_cross_validation,
)
from classifiers.evaluation.folds import assign_folds, check_fold_feasibility
from classifiers.feature.estimators import (
    CLASSIFIER_NAMES,
    DeviceChoice,
    XGBoostFeatureClassifier,
    make_classifier,
    make_logreg,
    resolve_xgboost_device,
)
from classifiers.evaluation.voting import VoteResult, vote

__all__ = [
    "CLASSIFIER_NAMES",
    "FUSION_CHOICES",
    "CVConfig",
    "CVDataset",
    "CVResult",
    "DeviceChoice",
    "FittedModel",
    "InputDataError",
    "RunSpec",
    "VoteResult",
    "XGBoostFeatureClassifier",
    "assign_folds",
    "build_dataset",
    "check_fold_feasibility",
    "fit_run_model",
    "make_classifier",
    "make_logreg",
    "plan_runs",
    "resolve_xgboost_device",
    "run_cross_validation",
    "vote",
]
