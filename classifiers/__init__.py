"""Classifiers, cross-validation, voting, metrics and reports on CNN feature stores.

Typical use (what ``python -m pipeline.cv_report`` does)::

    from features.store import load_store
    from classifiers import CVConfig, build_dataset, run_cross_validation
    from classifiers.report import write_report

    tables = [load_store(d) for d in store_dirs]
    config = CVConfig(scheme="bmc3", n_folds=6, seed=0)
    result = run_cross_validation(build_dataset(tables, config.scheme), config)
    write_report(result, "runs/report")

Modules: :mod:`~classifiers.models` (estimators, XGBoost device choice),
:mod:`~classifiers.dataset` (store validation, alignment, label schemes),
:mod:`~classifiers.folds` (grouped stratified folds),
:mod:`~classifiers.voting` (per-image voting),
:mod:`~classifiers.experiment` (cross-validation, fusion, final fit),
:mod:`~classifiers.metrics` and :mod:`~classifiers.report`.
"""

from classifiers.dataset import CVDataset, InputDataError, build_dataset
from classifiers.experiment import (
    FUSION_CHOICES,
    CVConfig,
    CVResult,
    FittedModel,
    RunSpec,
    fit_run_model,
    plan_runs,
    run_cross_validation,
)
from classifiers.folds import assign_folds, check_fold_feasibility
from classifiers.models import (
    CLASSIFIER_NAMES,
    DeviceChoice,
    XGBoostFeatureClassifier,
    make_classifier,
    make_logreg,
    resolve_xgboost_device,
)
from classifiers.voting import VoteResult, vote

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
