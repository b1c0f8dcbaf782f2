"""Cross-validation of the classifiers on a :class:`~classifiers.evaluation.cv_dataset.CVDataset`.

A *run* is one classifier on one way of using the stores:

* ``single`` -- one store;
* ``concat`` -- the stores' features concatenated row by row (rows aligned on
  ``(image_id, aug)``), one model;
* ``mean-proba`` -- one model per store, row probabilities averaged over the
  stores, then voting (Rakhlin et al. 2018 fuse their backbones' models
  similarly).  Its per-store models are reported too, as ``single`` runs
  named ``<classifier>-<store>``, since they cost nothing extra.

All runs share one fold assignment.  Models are fitted on training-fold rows
only (the logistic regression's scaler included), so nothing is learnt from
the test fold.  :func:`fit_run_model` with ``rows=None`` fits the same model
on all data (the final model).
"""

from __future__ import annotations

import logging
import numbers
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.base import clone

from classifiers.evaluation.cv_dataset import CVDataset, InputDataError
from classifiers.evaluation.folds import GroupedFolds
from classifiers.feature.estimators import (CV_CLASSIFIER_NAMES, DEVICE_CHOICES, EARLY_STOPPING_NAMES,
                                            INSTANCE_CLASSIFIER_NAMES, XGBOOST_NAMES, DeviceChoice, make_classifier,
                                            resolve_xgboost_device)
from classifiers.feature.tuning import PARAM_GRIDS, InnerCVClassifier, public_params
from classifiers.evaluation.voting import vote

logger = logging.getLogger(__name__)

FUSION_CHOICES = ("concat", "mean-proba")


@dataclass(frozen=True)
class CVConfig:
    """Settings of a cross-validated evaluation.

    Parameters
    ----------
    scheme : str, default="auto"
        Label scheme to report in (see :func:`classifiers.evaluation.cv_dataset.build_dataset`):
        ``auto``, ``classes``, a built-in name or a mapping file.
    n_folds : int, default=6
        Folds of StratifiedGroupKFold (El Agouri et al. used 6).
    classifiers : tuple of str, default=("xgboost", "logreg")
        Any of :data:`classifiers.feature.estimators.CV_CLASSIFIER_NAMES`; ``mil`` (attention
        pooling of the instances) needs instance stores; ``lightgbm`` needs the lightgbm package.
    fusion : tuple of str, default=("concat", "mean-proba")
        How several stores are combined; ignored with one store.
    seed : int, default=0
        Seeds the fold shuffling and the classifiers.
    n_jobs : int, default=2
        XGBoost threads.
    device : {"auto", "cpu", "cuda"}, default="auto"
        XGBoost device (see :func:`classifiers.feature.estimators.resolve_xgboost_device`).
    tune : bool, default=False
        Choose each classifier's hyper-parameters by an inner grouped 3-fold CV of the
        training rows (:data:`classifiers.feature.tuning.PARAM_GRIDS`); the choice of every fold is
        reported.  Off: the documented defaults of :mod:`classifiers.feature.estimators`.  The
        classifiers with early stopping (``xgboost-es``, ``lightgbm``, ``mil``) have no grid: they
        choose their length on a grouped inner split either way, and ``tune`` reports it per fold.
    """

    scheme: str = "auto"
    n_folds: int = 6
    classifiers: tuple = ("xgboost", "logreg")
    fusion: tuple = FUSION_CHOICES
    seed: int = 0
    n_jobs: int = 2
    device: str = "auto"
    tune: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` on unknown names or out-of-range numbers."""
        for name, value, minimum in (("n_folds", self.n_folds, 2), ("n_jobs", self.n_jobs, 1), ("seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        if not self.classifiers:
            raise ValueError(f"no classifier selected; choose from {CV_CLASSIFIER_NAMES}")
        for name in self.classifiers:
            if name not in CV_CLASSIFIER_NAMES:
                raise ValueError(f"unknown classifier {name!r}; choose from {CV_CLASSIFIER_NAMES}")
        if "lightgbm" in self.classifiers:  # a missing optional package fails before any training
            from classifiers.feature.boosting import import_lightgbm

            import_lightgbm()
        for name in self.fusion:
            if name not in FUSION_CHOICES:
                raise ValueError(f"unknown fusion {name!r}; choose from {FUSION_CHOICES}")


@dataclass(frozen=True)
class RunSpec:
    """One classifier on one combination of stores."""

    name: str
    classifier: str
    fusion: str  # "single", "concat" or "mean-proba"
    stores: tuple  # store indices


def plan_runs(n_stores: int, store_names, config: CVConfig) -> list:
    """The runs to evaluate for ``n_stores`` stores under ``config``."""
    config.validate()
    runs = []
    for clf in config.classifiers:
        if n_stores == 1:
            runs.append(RunSpec(clf, clf, "single", (0,)))
            continue
        if not config.fusion:
            raise ValueError(f"{n_stores} stores given but no fusion selected; choose from {FUSION_CHOICES}")
        for fusion in config.fusion:
            runs.append(RunSpec(f"{clf}-{fusion}", clf, fusion, tuple(range(n_stores))))
        if "mean-proba" in config.fusion:
            runs.extend(RunSpec(f"{clf}-{store_names[s]}", clf, "single", (s,)) for s in range(n_stores))
    return runs


@dataclass
class FittedModel:
    """Fitted estimator(s) of one run; probabilities follow ``classes``."""

    spec: RunSpec
    estimators: list  # one per feature block
    blocks: list  # tuple of store indices feeding each estimator
    classes: tuple
    chosen_params: list = field(default_factory=list)  # per estimator, with config.tune

    def predict_proba(self, Xs, rows=None) -> np.ndarray:
        """Row probabilities (n_rows, n_classes), averaged over estimators.

        Parameters
        ----------
        Xs : list of ndarray
            Feature matrices of all stores (as in ``CVDataset.X``).
        rows : array-like of int, optional
            Rows to predict; all by default.
        """
        total = None
        for est, block in zip(self.estimators, self.blocks):
            proba = _aligned_proba(est, _features(Xs, block, rows), self.classes)
            total = proba if total is None else total + proba
        return total / len(self.estimators)


def _features(Xs, block, rows) -> np.ndarray:
    mats = [Xs[s] if rows is None else Xs[s][rows] for s in block]
    # Along the last axis: the features of a row, or of each instance of a bag.
    return mats[0] if len(mats) == 1 else np.concatenate(mats, axis=-1)


def run_inputs(dataset: CVDataset, classifier: str) -> list:
    """What ``classifier`` takes from each store: the feature rows (``dataset.X``), or for an
    instance classifier (``mil``) the bags of instances (``dataset.instances``).

    Raises
    ------
    InputDataError
        An instance classifier on a store of one vector per augmentation.
    """
    if classifier not in INSTANCE_CLASSIFIER_NAMES:
        return dataset.X
    instances = list(dataset.instances) or [None] * len(dataset.X)
    lacking = [name for name, bags in zip(dataset.store_names, instances) if bags is None]
    if lacking:
        raise InputDataError(
            f"classifier {classifier!r} pools instances, but store(s) {', '.join(map(repr, lacking))} hold one "
            "vector per augmentation; extract an instance store (pipeline.extract --mode whole --instances "
            "cells-4x3) or choose another classifier")
    return instances


def _aligned_proba(estimator, X, classes) -> np.ndarray:
    """predict_proba with columns in ``classes`` order (0 for classes unseen in training)."""
    proba = estimator.predict_proba(X)
    out = np.zeros((X.shape[0], len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for j, c in enumerate(estimator.classes_):
        out[:, index[c]] = proba[:, j]
    return out


def fit_run_model(dataset: CVDataset, spec: RunSpec, config: CVConfig, rows=None, device: str | None = None):
    """Fit the model(s) of one run on ``rows`` (all rows by default).

    Parameters
    ----------
    dataset : CVDataset
    spec : RunSpec
    config : CVConfig
    rows : array-like of int, optional
        Training rows; ``None`` fits the final model on all data.
    device : str, optional
        Resolved XGBoost device; resolved from ``config.device`` if omitted.

    Returns
    -------
    FittedModel
    """
    if device is None and spec.classifier in XGBOOST_NAMES:
        device = resolve_xgboost_device(config.device).device
    template = make_classifier(spec.classifier, seed=config.seed, n_jobs=config.n_jobs, device=device or "cpu")
    blocks = [spec.stores] if spec.fusion in ("single", "concat") else [(s,) for s in spec.stores]
    y = dataset.row_labels if rows is None else dataset.row_labels[rows]
    Xs = run_inputs(dataset, spec.classifier)
    # Inner splits on these rows only, grouped like the outer folds (patient, else image).
    groups = dataset.images["group"].to_numpy()[dataset.row_image]
    groups = groups if rows is None else groups[rows]
    if spec.classifier in INSTANCE_CLASSIFIER_NAMES + EARLY_STOPPING_NAMES:
        # No grid: the network chooses its epochs, the boosters their rounds, by early stopping on
        # a grouped inner split of these rows.
        estimators = [clone(template).fit(_features(Xs, block, rows), y, groups=groups) for block in blocks]
        chosen = [_early_stopping_choice(est) for est in estimators] if config.tune else []
        return FittedModel(spec, estimators, blocks, dataset.classes, chosen)
    if not config.tune:
        estimators = [clone(template).fit(_features(Xs, block, rows), y) for block in blocks]
        return FittedModel(spec, estimators, blocks, dataset.classes)
    estimators, chosen = [], []
    for block in blocks:
        search = InnerCVClassifier(template, PARAM_GRIDS[spec.classifier], random_state=config.seed)
        search.fit(_features(Xs, block, rows), y, groups=groups)
        estimators.append(search.best_estimator_)  # a plain estimator: saved like an untuned one
        chosen.append(public_params(search.best_params_))
    return FittedModel(spec, estimators, blocks, dataset.classes, chosen)


def _early_stopping_choice(estimator) -> dict:
    """What early stopping chose: ``{"epochs": n}`` (MIL) or ``{"rounds": n}`` (boosters)."""
    if hasattr(estimator, "n_epochs_"):
        return {"epochs": int(estimator.n_epochs_)}
    return {"rounds": int(estimator.n_rounds_)}


@dataclass
class RunResult:
    """Out-of-fold predictions of one run.

    Attributes
    ----------
    spec : RunSpec
    store_names : tuple of str
    row_proba : ndarray (n_rows, n_classes)
        Out-of-fold probability of every augmentation row.
    chosen_params : list of dict
        With ``CVConfig.tune``: per fold (and per store for ``mean-proba``) the
        hyper-parameters chosen by the inner CV: ``fold``, ``store``, then the values.
    predictions : pandas.DataFrame
        One row per image: ``image_id``, ``group``, ``truth``, ``fold``,
        ``prediction`` (majority vote), ``prediction_mean_proba``, ``n_aug``,
        ``votes_<class>``, ``proba_<class>`` (mean probability), ``model``,
        ``classifier``, ``fusion``, ``stores``.
    """

    spec: RunSpec
    store_names: tuple
    row_proba: np.ndarray
    predictions: pd.DataFrame
    chosen_params: list = field(default_factory=list)


@dataclass
class CVResult:
    """Everything a report needs."""

    dataset: CVDataset
    config: CVConfig
    folds: pd.DataFrame  # image_id, group, label, fold
    runs: list = field(default_factory=list)
    device: DeviceChoice | None = None
    seconds: float = 0.0


def check_scheme(dataset: CVDataset, scheme) -> None:
    """Raise unless `dataset` was built in `scheme` (as given to ``build_dataset``: ``auto``, a
    name, a mapping file or a LabelScheme)."""
    label_scheme = dataset.label_scheme
    if scheme in (None, "auto") or scheme == dataset.scheme or scheme == label_scheme:
        return
    if isinstance(scheme, str) and label_scheme is not None and scheme == label_scheme.source:
        return
    raise InputDataError(f"dataset is in scheme {dataset.scheme!r} but config asks for {getattr(scheme, 'name', scheme)!r}")


def image_predictions(dataset: CVDataset, folds: np.ndarray, row_proba: np.ndarray, spec: RunSpec) -> pd.DataFrame:
    """Per-image table of votes, mean probabilities and both voting decisions
    (:func:`classifiers.predictions.predictions_table`)."""
    from classifiers.predictions import predictions_table

    images = dataset.images
    return predictions_table(
        images["image_id"].to_numpy(), vote(dataset.row_image, row_proba, len(images)), dataset.classes,
        images["n_aug"].to_numpy(), truth=images["label"].to_numpy(), groups=images["group"].to_numpy(),
        folds=folds, magnification=images.get("magnification"),
        run={"model": spec.name, "classifier": spec.classifier, "fusion": spec.fusion,
             "stores": "+".join(dataset.store_names[s] for s in spec.stores)})


def run_cross_validation(dataset: CVDataset, config: CVConfig) -> CVResult:
    """Grouped, stratified K-fold CV of every planned run on shared folds.

    Parameters
    ----------
    dataset : CVDataset
    config : CVConfig

    Returns
    -------
    CVResult

    Raises
    ------
    InputDataError
        If the folds are infeasible (checked before any training).
    """
    start = time.perf_counter()
    check_scheme(dataset, config.scheme)
    specs = plan_runs(len(dataset.X), dataset.store_names, config)
    for spec in specs:
        run_inputs(dataset, spec.classifier)  # an instance classifier without instances fails before training
    images = dataset.images
    image_folds = GroupedFolds(config.n_folds, config.seed).assign(images["label"].to_numpy(),
                                                                   images["group"].to_numpy())
    row_folds = image_folds[dataset.row_image]
    device = resolve_xgboost_device(config.device) if set(XGBOOST_NAMES) & set(config.classifiers) else None

    # Row probabilities per (classifier, feature block); mean-proba runs reuse
    # the per-store blocks so each model is fitted once per fold.
    blocks = {}
    for spec in specs:
        parts = [spec.stores] if spec.fusion in ("single", "concat") else [(s,) for s in spec.stores]
        for block in parts:
            blocks.setdefault((spec.classifier, block), np.zeros((len(dataset.meta), len(dataset.classes))))
    chosen = {key: [] for key in blocks}
    for k in range(config.n_folds):
        train, test = np.flatnonzero(row_folds != k), np.flatnonzero(row_folds == k)
        t0 = time.perf_counter()
        for (clf, block), proba in blocks.items():
            spec = RunSpec(clf, clf, "single" if len(block) == 1 else "concat", block)
            model = fit_run_model(dataset, spec, config, rows=train, device=device.device if device else None)
            proba[test] = model.predict_proba(run_inputs(dataset, clf), rows=test)
            for params in model.chosen_params:
                store = "+".join(dataset.store_names[s] for s in block)
                chosen[(clf, block)].append({"fold": k, "store": store, **params})
        logger.info(
            "fold %d (%d of %d): %d train rows, %d test images, %d models in %.1fs",
            k, k + 1, config.n_folds, len(train), int((image_folds == k).sum()), len(blocks),
            time.perf_counter() - t0,
        )

    runs = []
    for spec in specs:
        if spec.fusion == "mean-proba":
            row_proba = np.mean([blocks[(spec.classifier, (s,))] for s in spec.stores], axis=0)
            params = [p for s in spec.stores for p in chosen[(spec.classifier, (s,))]]
        else:
            row_proba = blocks[(spec.classifier, spec.stores)]
            params = chosen[(spec.classifier, spec.stores)]
        runs.append(
            RunResult(
                spec,
                tuple(dataset.store_names[s] for s in spec.stores),
                row_proba,
                image_predictions(dataset, image_folds, row_proba, spec),
                sorted(params, key=lambda p: (p["fold"], p["store"])),
            )
        )
    folds = images[["image_id", "group", "label"]].assign(fold=image_folds)
    return CVResult(dataset, config, folds, runs, device, time.perf_counter() - start)
