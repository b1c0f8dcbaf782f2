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
            f"Use --folds {int(counts.min())} or fewer, a coarser --labels scheme that merges "
            "that class, or add images of that class."
        )


def assign_folds(image_labels, image_groups, n_folds: int = 6, seed: int = 0) -> np.ndarray:
    """Fold index (0 .. n_folds-1) for every image.

    Parameters
    ----------
    image_labels, image_groups : array-like
        One entry per image.
    n_folds : int, default=6
    seed : int, default=0
        Seed for StratifiedGroupKFold's shuffling.

    Returns
    -------
    ndarray of int
        ``folds[i]`` is the test fold of image ``i``.
    """
    labels, groups = np.asarray(image_labels), np.asarray(image_groups)
    check_fold_feasibility(labels, groups, n_folds)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=int)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[test] = k
    # Invariants the rest of the pipeline relies on.
    assert (folds >= 0).all(), "an image was left out of every test fold"
    assert pd.Series(folds).groupby(groups).nunique().max() == 1, "a group spans several folds"
    return folds
