"""Gradient-boosted trees whose number of rounds is chosen by early stopping on a grouped inner
split of the training rows.

* :class:`XGBoostEarlyStoppingClassifier` (classifier ``xgboost-es``) -- XGBoost on the device
  of :func:`~classifiers.feature.estimators.resolve_xgboost_device`;
* :class:`LightGBMFeatureClassifier` (classifier ``lightgbm``) -- LightGBM, the booster of
  Rakhlin et al. 2018, an optional dependency (``pip install lightgbm``).

Both hold out a share of the *images* they are given (every augmentation of an image, and every
image of a patient, on one side: the ``groups`` that cross-validation passes to ``fit``), boost
on the rest until the held-out multi-class log-loss has not improved for
``early_stopping_rounds`` rounds, and then train again on all the rows they were given for the
number of rounds found.  Inside an outer CV fold they are given the training rows only, so the
test fold chooses nothing.  One fit costs about two fits of the found length instead of the 25
of a grid search.
"""

from __future__ import annotations

import logging
import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.validation import check_is_fitted, validate_data

from classifiers.feature.estimators import (DeviceUnavailableError, XGBoostFeatureClassifier, booster_device,
                                            check_fraction, check_int, check_nonnegative, resolve_xgboost_device,
                                            training_data)

logger = logging.getLogger(__name__)

LIGHTGBM_INSTALL_HINT = ("classifier 'lightgbm' needs the lightgbm package: pip install lightgbm "
                         "(or pip install -e \".[lightgbm]\" in a source checkout), or use classifier 'xgboost-es'")


class LightGBMMissingError(ImportError, ValueError):
    """lightgbm is not installed; the message says how to install it.  Also a ValueError, so the
    command-line tools report it as a user error (one line, status 2)."""


def import_lightgbm():
    """``import lightgbm``, or :class:`LightGBMMissingError` saying how to install it."""
    try:
        import lightgbm
    except ImportError as exc:
        raise LightGBMMissingError(LIGHTGBM_INSTALL_HINT) from exc
    return lightgbm


def grouped_holdout(codes, groups, validation_fraction: float, random_state: int):
    """Indices ``(train, validation)`` of a stratified split that keeps each group on one side.

    Parameters
    ----------
    codes : ndarray of int (n_rows,)
        Encoded class of every row.
    groups : array-like (n_rows,)
        Image (or patient) of every row.
    validation_fraction : float in (0, 0.5]
        About this share of the groups is held out (the first fold of a shuffled
        ``StratifiedGroupKFold`` with ``round(1 / validation_fraction)`` folds).
    random_state : int

    Returns
    -------
    (ndarray, ndarray) or None
        ``None`` when no split can leave every class in the training side (a class with a single
        group): the caller then trains without early stopping.

    Raises
    ------
    ValueError
        If ``groups`` is missing or of the wrong length.
    """
    if groups is None:
        raise ValueError("early stopping needs `groups` (the image or patient of every row) for its inner split, "
                         "or validation_fraction=0")
    groups = np.asarray(groups)
    if len(groups) != len(codes):
        raise ValueError(f"groups has {len(groups)} entries for {len(codes)} rows")
    n_splits = min(max(2, int(round(1 / validation_fraction))), len(np.unique(groups)))
    if n_splits < 2:
        return None
    splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=int(random_state))
    with warnings.catch_warnings():
        # StratifiedGroupKFold warns when a class cannot be spread evenly; expected on few groups.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        train, val = next(splitter.split(np.zeros(len(codes)), codes, groups))
    if len(np.unique(codes[train])) < len(np.unique(codes)):
        return None
    return train, val


class _EarlyStopping:
    """The inner split, the search and the refit shared by both boosters.

    Subclasses implement ``_boost(X, codes, rounds, X_val, codes_val, **options) -> (model,
    best_rounds, best_loss)`` (``X_val`` ``None``: train ``rounds`` rounds on all of ``X``) and
    set ``classes_`` before calling :meth:`_fit_rounds`.
    """

    def _check_early_stopping_params(self) -> None:
        check_int("n_estimators", self.n_estimators, 1)
        check_int("early_stopping_rounds", self.early_stopping_rounds, 1)
        ok = isinstance(self.validation_fraction, numbers.Real) and not isinstance(self.validation_fraction, bool)
        if not ok or not 0 <= self.validation_fraction <= 0.5:
            raise ValueError(f"validation_fraction must be a number in [0, 0.5], got {self.validation_fraction!r}")
        if not isinstance(self.refit, (bool, np.bool_)):
            raise ValueError(f"refit must be True or False, got {self.refit!r}")

    def _fit_rounds(self, X, codes, groups, **boost_options):
        """Search the rounds on the inner split, then (``refit``) train on all rows."""
        split = None
        if self.validation_fraction > 0:
            split = grouped_holdout(codes, groups, self.validation_fraction, self.random_state)
            if split is None:
                logger.warning("%s: early stopping skipped (a class has a single group, the inner split cannot "
                               "keep it in training); training %d rounds on all rows",
                               type(self).__name__, self.n_estimators)
        if split is None:
            model, _, _ = self._boost(X, codes, self.n_estimators, None, None, **boost_options)
            self.n_rounds_, self.validation_loss_, self.inner_split_ = self.n_estimators, None, None
            return model
        train, val = split
        model, rounds, loss = self._boost(X[train], codes[train], self.n_estimators, X[val], codes[val], **boost_options)
        self.n_rounds_, self.validation_loss_, self.inner_split_ = int(rounds), float(loss), (train, val)
        logger.debug("%s: %d rounds chosen on %d held-out rows (log-loss %.4f)", type(self).__name__,
                     rounds, len(val), loss)
        if self.refit:
            # Training again on every row uses the held-out images too (a fifth of a training fold of
            # a few hundred images is worth more than the exact round count, which changes slowly
            # with the data size); the early-stopped model itself saw only the inner training side.
            model, _, _ = self._boost(X, codes, self.n_rounds_, None, None, **boost_options)
        return model


class XGBoostEarlyStoppingClassifier(_EarlyStopping, XGBoostFeatureClassifier):
    """XGBoost with the number of rounds chosen by early stopping on a grouped inner split.

    Labels may be any hashable values; ``predict_proba`` columns follow ``classes_``.

    Parameters
    ----------
    n_estimators : int, default=2000
        Most rounds; the number used is found by early stopping (``n_rounds_``).
    max_depth : int, default=3
    learning_rate : float, default=0.05
        Half of ``xgboost``'s 0.1: with early stopping choosing the length, a smaller step costs
        only time.
    subsample : float, default=0.8
    colsample_bytree : float, default=0.3
        A third of the ~2000 correlated CNN features per tree.
    min_child_weight : float, default=1.0
    reg_lambda : float, default=1.0
    n_jobs : int, default=2
    random_state : int, default=0
        Seed of the row/column subsampling and of the inner split.
    device : {"auto", "cpu", "cuda"}, default="auto"
        As :class:`~classifiers.feature.estimators.XGBoostFeatureClassifier`.
    validation_fraction : float, default=0.2
        Share of the training groups held out for early stopping (0: train ``n_estimators``
        rounds, no inner split).
    early_stopping_rounds : int, default=50
        Rounds without a lower held-out log-loss before stopping.
    refit : bool, default=True
        Train again on all rows for the rounds found (else keep the early-stopped booster, which
        did not see the held-out images).

    Attributes
    ----------
    classes_, n_features_in_, device_, booster_
        As :class:`~classifiers.feature.estimators.XGBoostFeatureClassifier`.
    n_rounds_ : int
        Rounds of the kept booster.
    validation_loss_ : float or None
        Held-out log-loss at ``n_rounds_`` (``None`` without an inner split).
    inner_split_ : (ndarray, ndarray) or None
        Row indices (into the rows given to ``fit``) of the inner training and held-out sides.
    """

    def __init__(self, n_estimators: int = 2000, max_depth: int = 3, learning_rate: float = 0.05,
                 subsample: float = 0.8, colsample_bytree: float = 0.3, min_child_weight: float = 1.0,
                 reg_lambda: float = 1.0, n_jobs: int = 2, random_state: int = 0, device: str = "auto",
                 validation_fraction: float = 0.2, early_stopping_rounds: int = 50, refit: bool = True):
        super().__init__(n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate,
                         subsample=subsample, colsample_bytree=colsample_bytree,
                         min_child_weight=min_child_weight, reg_lambda=reg_lambda, n_jobs=n_jobs,
                         random_state=random_state, device=device)
        self.validation_fraction = validation_fraction
        self.early_stopping_rounds = early_stopping_rounds
        self.refit = refit

    def fit(self, X, y, groups=None):
        """Fit on feature rows ``X`` and labels ``y``; ``groups`` (image or patient of every row)
        is required for the inner split unless ``validation_fraction=0``.

        Raises
        ------
        ValueError
            On bad parameters or data, or missing ``groups``.
        DeviceUnavailableError
            If ``device="cuda"`` and the booster did not train on a GPU.
        """
        self._validate_params()
        self._check_early_stopping_params()
        X, y, encoder = training_data(self, X, y)
        self.classes_ = encoder.classes_
        device = self.device if self.device != "auto" else resolve_xgboost_device("auto").device
        model = self._fit_rounds(X, encoder.transform(y), groups, device=device)
        used = booster_device(model.get_booster())
        if device == "cuda" and not used.startswith("cuda"):
            raise DeviceUnavailableError(f"XGBoost was asked for device='cuda' but trained on {used!r}")
        self.booster_, self.device_ = model, used
        return self

    def _boost(self, X, codes, rounds, X_val, codes_val, *, device):
        import xgboost

        params = {**self.booster_params(device), "n_estimators": int(rounds)}
        if X_val is None:
            model = xgboost.XGBClassifier(**params, n_jobs=self.n_jobs).fit(X, codes)
            return model, rounds, np.nan
        metric = "logloss" if len(self.classes_) == 2 else "mlogloss"
        model = xgboost.XGBClassifier(**params, n_jobs=self.n_jobs, eval_metric=metric,
                                      early_stopping_rounds=self.early_stopping_rounds)
        model.fit(X, codes, eval_set=[(X_val, codes_val)], verbose=False)
        best = int(model.best_iteration)
        # Without refit the early-stopped model is kept: XGBoost predicts with its first best + 1
        # rounds (best_iteration is saved in the booster file and read back by load_model).
        return model, best + 1, float(model.evals_result()["validation_0"][metric][best])


class LightGBMFeatureClassifier(_EarlyStopping, ClassifierMixin, BaseEstimator):
    """LightGBM on CNN feature vectors, rounds chosen by early stopping on a grouped inner split.

    Rakhlin et al. 2018 trained LightGBM on deep features of BACH (their published code: 70
    rounds at learning rate 0.1, up to 191 leaves of depth 7, 46 % of the features per tree).
    The defaults here are smaller trees and a smaller step, with the length found by early
    stopping: the training rows of one fold are 8-40 colour augmentations of ~250 images, so a
    deep tree fits the augmentations of single images.  Trains on the CPU (LightGBM's GPU build
    is a separate package); the device is logged.

    Parameters
    ----------
    n_estimators : int, default=2000
        Most rounds; the number used is ``n_rounds_``.
    learning_rate : float, default=0.05
    num_leaves : int, default=15
    max_depth : int, default=4
        ``-1``: no limit.
    min_child_samples : int, default=20
        Rows per leaf at least (with 8 augmentations, about three images).
    colsample_bytree : float, default=0.3
        Share of the features per tree (LightGBM's ``feature_fraction``).
    subsample : float, default=0.8
        Share of the rows per tree (``bagging_fraction``, redrawn every round).
    reg_lambda : float, default=1.0
        L2 penalty on leaf values.
    n_jobs : int, default=2
    random_state : int, default=0
        Seed of the sampling and of the inner split.
    validation_fraction : float, default=0.2
    early_stopping_rounds : int, default=50
    refit : bool, default=True
        As :class:`XGBoostEarlyStoppingClassifier`.

    Attributes
    ----------
    classes_ : ndarray
    n_features_in_ : int
    booster_ : lightgbm.Booster
    device_ : str
        Always ``"cpu"``.
    n_rounds_, validation_loss_, inner_split_
        As :class:`XGBoostEarlyStoppingClassifier`.
    """

    def __init__(self, n_estimators: int = 2000, learning_rate: float = 0.05, num_leaves: int = 15,
                 max_depth: int = 4, min_child_samples: int = 20, colsample_bytree: float = 0.3,
                 subsample: float = 0.8, reg_lambda: float = 1.0, n_jobs: int = 2, random_state: int = 0,
                 validation_fraction: float = 0.2, early_stopping_rounds: int = 50, refit: bool = True):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.max_depth = max_depth
        self.min_child_samples = min_child_samples
        self.colsample_bytree = colsample_bytree
        self.subsample = subsample
        self.reg_lambda = reg_lambda
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.validation_fraction = validation_fraction
        self.early_stopping_rounds = early_stopping_rounds
        self.refit = refit

    def _validate_params(self) -> None:
        self._check_early_stopping_params()
        check_int("num_leaves", self.num_leaves, 2)
        check_int("min_child_samples", self.min_child_samples, 1)
        check_int("n_jobs", self.n_jobs, 1)
        check_int("random_state", self.random_state, 0)
        if self.max_depth != -1:
            check_int("max_depth", self.max_depth, 1)
        check_fraction("colsample_bytree", self.colsample_bytree)
        check_fraction("subsample", self.subsample)
        for name in ("learning_rate", "reg_lambda"):
            check_nonnegative(name, getattr(self, name))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")

    def lightgbm_params(self, n_classes: int) -> dict:
        """LightGBM's native parameters for ``n_classes`` classes."""
        objective = {"objective": "binary"} if n_classes == 2 else {"objective": "multiclass", "num_class": n_classes}
        return {
            **objective,
            "metric": "binary_logloss" if n_classes == 2 else "multi_logloss",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "max_depth": self.max_depth,
            "min_data_in_leaf": self.min_child_samples,
            "feature_fraction": self.colsample_bytree,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1 else 0,
            "lambda_l2": self.reg_lambda,
            "num_threads": self.n_jobs,
            "seed": self.random_state,
            # Same numbers on a rerun; col-wise histograms suit many features and few rows.
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }

    def fit(self, X, y, groups=None):
        """Fit on feature rows ``X`` and labels ``y``; ``groups`` (image or patient of every row)
        is required for the inner split unless ``validation_fraction=0``.

        Raises
        ------
        LightGBMMissingError
            If lightgbm is not installed.
        ValueError
            On bad parameters or data, or missing ``groups``.
        """
        import_lightgbm()
        self._validate_params()
        X, y, encoder = training_data(self, X, y)
        self.classes_ = encoder.classes_
        logger.info("LightGBM runs on the CPU")
        self.booster_ = self._fit_rounds(X, encoder.transform(y), groups)
        self.device_ = "cpu"
        return self

    def _boost(self, X, codes, rounds, X_val, codes_val):
        lightgbm = import_lightgbm()

        params = self.lightgbm_params(len(self.classes_))
        data = lightgbm.Dataset(X, label=codes, params={"verbosity": -1})
        if X_val is None:
            return lightgbm.train(params, data, num_boost_round=int(rounds)), rounds, np.nan
        val = lightgbm.Dataset(X_val, label=codes_val, reference=data)
        booster = lightgbm.train(params, data, num_boost_round=int(rounds), valid_sets=[val],
                                 callbacks=[lightgbm.early_stopping(self.early_stopping_rounds, verbose=False)])
        best = int(booster.best_iteration) or int(rounds)
        loss = float(next(iter(booster.best_score["valid_0"].values())))
        if not self.refit:
            # Drop the rounds after the best, so predicting and saving need no best_iteration.
            booster = lightgbm.Booster(model_str=booster.model_to_string(num_iteration=best))
        return booster, best, loss

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n_rows, n_classes), columns = ``classes_``."""
        check_is_fitted(self, "booster_")
        X = validate_data(self, X, dtype=np.float32, ensure_all_finite=True, reset=False)
        proba = np.asarray(self.booster_.predict(X), dtype=np.float64)
        return np.column_stack([1 - proba, proba]) if proba.ndim == 1 else proba

    def predict(self, X) -> np.ndarray:
        """Most probable class label per row."""
        check_is_fitted(self, "booster_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
