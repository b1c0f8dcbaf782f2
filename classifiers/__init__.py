"""Models, cross-validation, predictions, heatmaps and reports (layout: docs/architecture.md).

The Python API (:mod:`classifiers.api`)::

    from classifiers import cross_validate, heatmap, load_model, predict_images, train, write_report

    result = cross_validate(["runs/features/efficientnet_lite0-<hash>"], classifiers=["logreg"])
    write_report(result, "runs/report")
    model = train(["runs/features/efficientnet_lite0-<hash>"], "runs/model", classifier="logreg")
    table = predict_images(load_model("runs/model"), ["new/a.png"]).table
    hm = heatmap(model, "new/a.png", out="runs/heatmaps")

Every model kind (:class:`FeatureModel`, :class:`TwoStageModel`, :class:`PatchCNN`) implements
:class:`Model`; :func:`load_model` reads any model directory.
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
from classifiers.evaluation.folds import GroupedFolds, assign_folds, check_fold_feasibility
from classifiers.feature.estimators import (
    CLASSIFIER_NAMES,
    DEFAULT_CLASSIFIERS,
    DeviceChoice,
    XGBoostFeatureClassifier,
    make_classifier,
    make_logreg,
    resolve_xgboost_device,
)
from classifiers.evaluation.voting import VoteResult, vote
from classifiers.feature.model import FeatureModel
from classifiers.feature.model_io import TrainConfig
from classifiers.patch_cnn.model import PatchCNN, PatchCNNConfig
from classifiers.predictions import PredictionResult, predictions_table
from classifiers.two_stage.model import TwoStageConfig, TwoStageModel
from classifiers.protocol import Model, load_model
from classifiers.api import cross_validate, heatmap, load_features, predict_images, train, write_report

__all__ = [
    "FeatureModel",
    "PatchCNN",
    "PatchCNNConfig",
    "TwoStageConfig",
    "TwoStageModel",
    "GroupedFolds",
    "Model",
    "PredictionResult",
    "TrainConfig",
    "cross_validate",
    "heatmap",
    "load_features",
    "load_model",
    "predict_images",
    "predictions_table",
    "train",
    "write_report",
    "CLASSIFIER_NAMES",
    "DEFAULT_CLASSIFIERS",
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
