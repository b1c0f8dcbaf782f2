"""Reading a model's predictions at coarser levels: its groupings and a cross-data-set mapping.

A model predicts the classes of its scheme; every grouping (:func:`data.mapping.groupings`:
bach4 -> bmc3, binary; mapping files given with ``--regroup``) is a *level* whose class is a
function of the predicted class.  A mapping given at prediction time (``--map``) may start
from the model's classes or from one of its groupings' classes: a BACH bach4 model read through
``{"benign": ["non-carcinoma"], "malignant": ["carcinoma"]}`` predicts BreakHis's benign /
malignant, so a user can measure domain shift on labelled images of another data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from classifiers.evaluation.patients import patient_accuracy

__all__ = ["Level", "level_accuracy", "prediction_levels", "truth_in"]


@dataclass(frozen=True)
class Level:
    """A level of reading: its classes and the class each model class becomes."""

    name: str
    classes: tuple
    from_model: dict


def prediction_levels(scheme, groupings=(), mapping=None) -> list:
    """The model's own level, each grouping's, and the mapping's (if any).

    Raises
    ------
    ValueError
        If `mapping` maps neither the model's classes nor those of one of its groupings.
    """
    levels = [Level(scheme.name, tuple(scheme.classes), {c: c for c in scheme.classes})]
    for g in groupings:
        levels.append(Level(g.name, tuple(g.classes), dict(zip(scheme.classes, g.map(scheme.classes)))))
    if mapping is not None:
        for base in levels:
            if not mapping.accepts(base.classes):
                to_base = [base.from_model[c] for c in scheme.classes]
                levels.append(Level(mapping.name, tuple(mapping.classes),
                                    dict(zip(scheme.classes, mapping.map(to_base)))))
                break
        else:
            readable = "; ".join(f"{lv.name}: {', '.join(lv.classes)}" for lv in levels)
            raise ValueError(f"{mapping.describe()} maps neither the model's classes nor those of its groupings "
                             f"({readable})")
    return levels


def truth_in(labels, classes, scheme=None):
    """True labels read in `classes`, or None when they cannot be.

    A label that is a class stays; otherwise the model's `scheme` (if it maps the labels into
    `classes`) or a built-in scheme whose classes are among `classes` (BreakHis subtypes ->
    benign / malignant) maps it.
    """
    from data.labels import normalise_label
    from data.mapping import builtin_scheme
    from data.labels import SCHEMES

    labels = [normalise_label(str(v)) for v in labels]
    if set(labels) <= set(classes):
        return np.asarray(labels, dtype=str)
    candidates = ([scheme] if scheme is not None else []) + [builtin_scheme(n) for n in SCHEMES]
    for candidate in candidates:
        if set(candidate.classes) <= set(classes) and not candidate.accepts(labels):
            try:
                return np.asarray(candidate.map(labels), dtype=str)
            except ValueError:
                continue
    return None


def level_accuracy(predictions: pd.DataFrame, truth, levels, scheme=None) -> pd.DataFrame:
    """Accuracy of labelled predictions at every level the truth can be read in.

    Parameters
    ----------
    predictions : pandas.DataFrame
        With ``prediction`` (model classes), and ``group`` for the patient-level accuracy.
    truth : array-like of str
        The input's labels, as found.
    levels : list of Level
    scheme : data.mapping.LabelScheme, optional
        The model's scheme (maps training-style labels into its classes).

    Returns
    -------
    pandas.DataFrame
        ``level``, ``classes``, ``n_images``, ``accuracy``, ``n_patients``, ``patient_accuracy``
        (Spanhol et al.'s mean over patients), one row per level the truth maps into.
    """
    rows = []
    pred = predictions["prediction"].astype(str).to_numpy()
    groups = predictions["group"].astype(str).to_numpy() if "group" in predictions else None
    model_truth = truth_in(truth, levels[0].classes, scheme) if levels else None
    for level in levels:
        if model_truth is not None:  # labels of the model's classes: read them as its predictions
            level_truth = np.array([level.from_model[t] for t in model_truth], dtype=str)
        else:
            level_truth = truth_in(truth, level.classes)
        if level_truth is None:
            continue
        level_pred = np.array([level.from_model[p] for p in pred], dtype=str)
        row = {"level": level.name, "classes": ", ".join(level.classes), "n_images": int(len(pred)),
               "accuracy": float(np.mean(level_pred == level_truth)) if len(pred) else float("nan")}
        if groups is not None:
            row["n_patients"] = int(len(set(groups)))
            row["patient_accuracy"] = patient_accuracy(level_truth, level_pred, groups)
        rows.append(row)
    return pd.DataFrame(rows)
