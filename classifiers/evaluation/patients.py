"""Patient-level and per-magnification accuracy, as BreakHis papers report them.

Spanhol et al. (2016, IEEE TBME 63(7)) define, for a patient P with N_P images of which N_rec
are classified correctly, the *patient score* N_rec / N_P, and the *patient recognition rate*
as the mean of the patient scores over all patients; the *image recognition rate* is the plain
image-level accuracy.  Patients are the CV groups (``group``), so with the default BreakHis
grouping a patient is all slides that share a number (:mod:`data.breakhis`).  BreakHis results
are given per magnification (40x, 100x, 200x, 400x): :func:`magnification_table` gives both
rates per magnification of a run over all magnifications.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["magnification_table", "patient_accuracy", "patient_table"]


def patient_table(truth, pred, groups) -> pd.DataFrame:
    """One row per patient (group): ``group``, ``n_images``, ``n_correct``, ``score``."""
    correct = np.asarray(truth, dtype=str) == np.asarray(pred, dtype=str)
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=str), "correct": correct})
    table = frame.groupby("group", sort=True)["correct"].agg(n_images="size", n_correct="sum").reset_index()
    table["n_correct"] = table["n_correct"].astype(int)
    table["score"] = table["n_correct"] / table["n_images"]
    return table


def patient_accuracy(truth, pred, groups) -> float:
    """Patient recognition rate of Spanhol et al. (2016): the mean over patients of each
    patient's image accuracy (NaN without images).

    Examples
    --------
    >>> patient_accuracy(["a", "a", "a", "b"], ["a", "a", "b", "b"], ["p1", "p1", "p1", "p2"])
    0.8333333333333333
    """
    if len(np.asarray(truth)) == 0:
        return float("nan")
    return float(patient_table(truth, pred, groups)["score"].mean())


def magnification_table(predictions: pd.DataFrame, column: str = "prediction") -> pd.DataFrame:
    """Image- and patient-level accuracy per magnification (and over all of them).

    Parameters
    ----------
    predictions : pandas.DataFrame
        Per-image predictions with ``truth``, `column`, ``group`` and ``magnification``.

    Returns
    -------
    pandas.DataFrame
        ``magnification`` (``40``... then ``all``), ``n_images``, ``n_patients``,
        ``image_accuracy``, ``patient_accuracy``; empty when there is no magnification.
    """
    columns = ["magnification", "n_images", "n_patients", "image_accuracy", "patient_accuracy"]
    if "magnification" not in predictions.columns or not (predictions["magnification"].astype(str) != "").any():
        return pd.DataFrame(columns=columns)
    mags = predictions["magnification"].astype(str)
    order = sorted(set(mags), key=lambda m: (not m.isdigit(), int(m) if m.isdigit() else 0, m))
    rows = []
    for mag, part in [(m, predictions[mags == m]) for m in order] + [("all", predictions)]:
        truth, pred, groups = part["truth"].astype(str), part[column].astype(str), part["group"].astype(str)
        rows.append({"magnification": mag, "n_images": int(len(part)), "n_patients": int(groups.nunique()),
                     "image_accuracy": float((truth == pred).mean()),
                     "patient_accuracy": patient_accuracy(truth, pred, groups)})
    return pd.DataFrame(rows, columns=columns)
