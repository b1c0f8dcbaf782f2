"""Grouped, stratified fold assignment at image level.

Folds are drawn over *images* (not augmented rows) with
:class:`sklearn.model_selection.StratifiedGroupKFold`: stratified by the image
label, grouped by patient (``group``; equal to the image id when the manifest
had no patient).  Every row then takes its image's fold, so all augmentations
of an image and all images of a patient are in one fold.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from classifiers.evaluation.cv_dataset import InputDataError


def check_fold_feasibility(image_labels, image_groups, n_folds: int) -> None:
    """Raise before training if grouped stratified ``n_folds``-fold CV is impossible.

    Every class needs at least ``n_folds`` distinct groups, otherwise some
    test fold has no image of that class (StratifiedGroupKFold only warns).

    Parameters
    ----------
    image_labels, image_groups : array-like of str
        One entry per image.
    n_folds : int

    Raises
    ------
    InputDataError
        With the offending classes, their group counts and what to do.
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, numbers.Integral) or n_folds < 2:
        raise InputDataError(f"the number of folds must be an integer >= 2, got {n_folds!r}")
    frame = pd.DataFrame({"label": np.asarray(image_labels), "group": np.asarray(image_groups)})
    counts = frame.groupby("label")["group"].nunique().sort_values()
    short = counts[counts < n_folds]
    if len(short):
        detail = ", ".join(f"{label!r}: {n}" for label, n in short.items())
        unit = "patient groups" if (frame["group"].nunique() < len(frame)) else "images"
        raise InputDataError(
            f"{len(short)} class(es) have fewer {unit} than folds ({n_folds}): {detail}. "
            f"Use `n_folds={int(counts.min())}` or fewer, a coarser `scheme` that merges "
            "that class, or add images of that class."
        )


class GroupedFolds:
    """Grouped, stratified K folds over images, as a scikit-learn splitter.

    Every image of a group (patient) is in one test fold, and each fold holds every class
    (checked before splitting: :func:`check_fold_feasibility`).  The folds are those of
    :class:`sklearn.model_selection.StratifiedGroupKFold` with ``shuffle=True`` and
    ``random_state=seed``, so a seed names the same folds in every release.

    Parameters
    ----------
    n_splits : int, default=6
    seed : int, default=0

    Examples
    --------
    >>> folds = GroupedFolds(n_splits=2, seed=0).assign(["a", "a", "b", "b"], ["p1", "p2", "p3", "p4"])
    >>> sorted(folds.tolist())
    [0, 0, 1, 1]
    """

    def __init__(self, n_splits: int = 6, seed: int = 0):
        self.n_splits = n_splits
        self.seed = seed

    def __repr__(self) -> str:
        return f"GroupedFolds(n_splits={self.n_splits}, seed={self.seed})"

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        """Number of folds."""
        return self.n_splits

    def split(self, X, y, groups):
        """Yield ``(train, test)`` image indices of each fold; ``X`` only gives the length."""
        labels, groups = np.asarray(y), np.asarray(groups)
        check_fold_feasibility(labels, groups, self.n_splits)
        splitter = StratifiedGroupKFold(n_splits=self.n_splits, shuffle=True, random_state=self.seed)
        yield from splitter.split(np.zeros(len(labels)), labels, groups)

    def assign(self, y, groups) -> np.ndarray:
        """``folds[i]``: the test fold (0 .. n_splits-1) of image ``i``."""
        groups = np.asarray(groups)
        folds = np.full(len(groups), -1, dtype=int)
        for k, (_, test) in enumerate(self.split(None, y, groups)):
            folds[test] = k
        # Invariants the rest of the pipeline relies on.
        assert (folds >= 0).all(), "an image was left out of every test fold"
        assert pd.Series(folds).groupby(groups).nunique().max() == 1, "a group spans several folds"
        return folds


def assign_folds(image_labels, image_groups, n_folds: int = 6, seed: int = 0) -> np.ndarray:
    """``GroupedFolds(n_folds, seed).assign(image_labels, image_groups)``: the fold of every image."""
    return GroupedFolds(n_folds, seed).assign(image_labels, image_groups)
