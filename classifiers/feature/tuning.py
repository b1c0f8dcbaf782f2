"""Hyper-parameters chosen by an inner grouped cross-validation of the training rows only.

:class:`InnerCVClassifier` wraps a classifier and a grid; its ``fit`` runs
:class:`~sklearn.model_selection.GridSearchCV` over folds grouped like the outer ones (every
augmentation of an image, and every image of a patient, in one inner fold), refits the best
candidate on all the rows it was given and remembers the choice.  Inside an outer CV fold it is
given the training rows only, so the test fold never influences the choice.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.utils.validation import check_is_fitted

logger = logging.getLogger(__name__)

#: Candidates per classifier name (``classifiers.feature.estimators.make_classifier``).  Small on purpose: an
#: outer 6-fold CV with 3 inner folds fits ``6 * (3 * candidates + 1)`` models per run.
#: XGBoost: shallow vs deeper trees, few vs more rounds, narrow vs wide column sampling.
#: Logistic regression: L2 strength over three decades (features are standardised).
PARAM_GRIDS = {
    "xgboost": {"max_depth": [2, 4], "n_estimators": [150, 300], "colsample_bytree": [0.3, 0.8]},
    "logreg": {"logreg__C": [0.001, 0.01, 0.1, 1.0]},
    "logreg-sqrt": {"logreg__C": [0.001, 0.01, 0.1, 1.0]},
}


def public_params(params: dict) -> dict:
    """``{"logreg__C": 0.1}`` -> ``{"C": 0.1}``: the names a user knows from the docs."""
    return {key.rsplit("__", 1)[-1]: value for key, value in params.items()}


class InnerCVClassifier(ClassifierMixin, BaseEstimator):
    """A classifier whose hyper-parameters are chosen by grouped CV on its training rows.

    Parameters
    ----------
    estimator : estimator
        Unfitted classifier; its parameters outside ``param_grid`` are kept.
    param_grid : dict or list of dict
        As for :class:`~sklearn.model_selection.GridSearchCV`.
    n_splits : int, default=3
        Inner folds; lowered to the smallest per-class group count when needed, and with
        fewer than 2 groups in some class the search is skipped (the estimator's own
        parameters are used, and logged).
    scoring : str, default="accuracy"
        Row-level score of the candidates.
    random_state : int, default=0
        Seed of the inner fold shuffling.

    Attributes
    ----------
    best_params_ : dict
        The chosen values (grid names), ``{}`` when the search was skipped.
    best_estimator_ : estimator
        ``estimator`` with ``best_params_``, fitted on all the rows given to ``fit``.
    cv_scores_ : pandas.DataFrame
        Mean and sd of the inner score per candidate.
    classes_ : ndarray
    """

    def __init__(self, estimator, param_grid, n_splits: int = 3, scoring: str = "accuracy",
                 random_state: int = 0):
        self.estimator = estimator
        self.param_grid = param_grid
        self.n_splits = n_splits
        self.scoring = scoring
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        """Choose the parameters on ``(X, y)`` grouped by ``groups``, then refit on all rows.

        Parameters
        ----------
        X : array-like (n_rows, n_features)
        y : array-like (n_rows,)
        groups : array-like (n_rows,)
            Image (or patient) of every row; required, since rows of one image are not
            independent and must not be split between inner folds.
        """
        if groups is None:
            raise ValueError("InnerCVClassifier.fit needs groups (the image or patient of every row)")
        y, groups = np.asarray(y), np.asarray(groups)
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} entries for {len(y)} rows")
        per_class = pd.DataFrame({"y": y, "g": groups}).groupby("y")["g"].nunique()
        n_splits = int(min(self.n_splits, per_class.min()))
        if n_splits < 2:
            logger.warning("inner CV skipped: class %r has a single group; using the default "
                           "parameters", per_class.idxmin())
            self.best_params_, self.cv_scores_ = {}, pd.DataFrame()
            self.best_estimator_ = clone(self.estimator).fit(X, y)
        else:
            search = GridSearchCV(
                clone(self.estimator), self.param_grid, scoring=self.scoring, refit=True,
                cv=StratifiedGroupKFold(n_splits, shuffle=True, random_state=self.random_state),
                error_score="raise",
            )
            with warnings.catch_warnings():
                # StratifiedGroupKFold warns when a class cannot be spread evenly; expected.
                warnings.filterwarnings("ignore", message="The least populated class",
                                        category=UserWarning)
                search.fit(X, y, groups=groups)
            self.best_params_ = dict(search.best_params_)
            self.best_estimator_ = search.best_estimator_
            results = search.cv_results_
            self.cv_scores_ = pd.DataFrame({
                "params": [public_params(p) for p in results["params"]],
                "mean_score": results["mean_test_score"],
                "sd_score": results["std_test_score"],
            })
        self.classes_ = self.best_estimator_.classes_
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict_proba(X)

    def predict(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict(X)
