"""The one per-image predictions table, built from per-view probabilities by voting.

Every model kind predicts several views of an image (colour augmentations of a deep-feature
model, rotations/flips of the two-stage CNN); :func:`predictions_table` votes over them
(:func:`classifiers.evaluation.voting.vote`) and lays out the table that ``predictions.csv``
holds, for ``pipeline.predict`` and for cross-validation alike (docs/file-formats.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from classifiers.evaluation.voting import VoteResult

log = logging.getLogger(__name__)

#: Default of the low-confidence rule: an image is flagged when its highest mean probability
#: is below this, or when majority voting and mean-probability voting disagree.
MIN_CONFIDENCE = 0.5


def flag_low_confidence(table: pd.DataFrame, classes, min_confidence: float = MIN_CONFIDENCE) -> pd.DataFrame:
    """Set ``confidence`` (the highest mean probability) and ``low_confidence`` in ``table``.

    The rule (documented in docs/train-predict.md): ``low_confidence`` is true when
    ``confidence < min_confidence`` -- the model gives its best class less than even odds -- or
    when the majority vote and the mean-probability decision differ (the views disagree).
    On 100 bach-dev images in cross-validation such images were right far less often than the
    others (see the docs for the numbers).

    Parameters
    ----------
    table : pandas.DataFrame
        A predictions table with ``proba_<class>``, ``prediction``, ``prediction_mean_proba``.
    classes : sequence of str
    min_confidence : float in [0, 1], default=0.5

    Returns
    -------
    pandas.DataFrame
        ``table`` itself, with the two columns set.
    """
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    proba = table[[f"proba_{c}" for c in classes]].to_numpy(dtype=float)
    confidence = proba.max(axis=1) if len(table) else np.zeros(0)
    table["confidence"] = confidence
    table["low_confidence"] = (confidence < min_confidence) | (
        table["prediction"].to_numpy(dtype=str) != table["prediction_mean_proba"].to_numpy(dtype=str))
    return table


@dataclass
class PredictionResult:
    """Per-image predictions and what could not be predicted.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per predicted image, in input order: ``image`` (path as given),
        ``prediction`` (majority vote), ``prediction_mean_proba``, ``n_aug``,
        ``proba_<class>`` (mean probability over augmentations), ``votes_<class>``,
        ``stain_note`` (why Macenko was not applied, empty when it was), ``confidence`` and
        ``low_confidence`` (:func:`flag_low_confidence`).
    skipped : list of dict
        ``{"image": path, "reason": ...}`` for every input that could not be read.
    classes : tuple of str
    row_proba : ndarray (n_rows, n_classes)
        Probability of every (image, augmentation) row, rows ordered as ``row_image``.
    row_image : ndarray of int
        Index into ``table`` of every row.
    seconds : float
    device : str
        Where the backbone ran.
    n_images : int
        Image files tried (the inputs' files, folders expanded; ``table`` plus the unreadable).
    """

    table: pd.DataFrame
    skipped: list = field(default_factory=list)
    classes: tuple = ()
    row_proba: np.ndarray | None = None
    row_image: np.ndarray | None = None
    seconds: float = 0.0
    device: str = ""
    n_images: int = 0


def predictions_table(images, votes: VoteResult | None, classes, n_aug, *, stain_note=None,
                      truth=None, groups=None, folds=None, magnification=None, run: dict | None = None
                      ) -> pd.DataFrame:
    """One row per image: decisions, votes and mean probabilities of its views.

    Parameters
    ----------
    images : sequence of str
        Image ids (paths as given to predict, store ids in cross-validation).
    votes : VoteResult or None
        The images' votes; ``None`` gives the empty prediction table with every column.
    classes : sequence of str
        Class of each probability column.
    n_aug : int or array of int
        Views voted per image.
    stain_note : sequence of str, optional
        Prediction table (required there): why an image was not stain-normalised ("" when it was).
    truth, groups, folds, magnification, run :
        Cross-validation table (out-of-fold predictions): true label, group, test fold and
        (optional) magnification per image, and the run's ``model``, ``classifier``, ``fusion``,
        ``stores``.

    Returns
    -------
    pandas.DataFrame
        Prediction: ``image, prediction, prediction_mean_proba, n_aug, proba_<c>..., votes_<c>...,
        stain_note, confidence, low_confidence``.  Cross-validation: ``image_id, group, truth, prediction,
        prediction_mean_proba, fold, n_aug, [magnification,] votes_<c>..., proba_<c>..., model,
        classifier, fusion, stores``.
    """
    names = np.asarray(classes, dtype=object)
    if votes is None:
        columns = ["image", "prediction", "prediction_mean_proba", "n_aug"]
        return pd.DataFrame(columns=columns + [f"proba_{c}" for c in classes] + [f"votes_{c}" for c in classes]
                            + ["stain_note", "confidence", "low_confidence"])
    decisions = {"prediction": names[votes.majority], "prediction_mean_proba": names[votes.mean_proba_argmax]}
    votes_cols = {f"votes_{c}": votes.votes[:, j] for j, c in enumerate(classes)}
    proba_cols = {f"proba_{c}": votes.mean_proba[:, j] for j, c in enumerate(classes)}
    if run is None:
        table = pd.DataFrame({"image": list(images), **decisions, "n_aug": n_aug, **proba_cols, **votes_cols,
                              "stain_note": list(stain_note)})
        return flag_low_confidence(table, classes)
    extra = {} if magnification is None else {"magnification": np.asarray(magnification)}
    frame = pd.DataFrame({"image_id": images, "group": groups, "truth": truth, **decisions, "fold": folds,
                          "n_aug": n_aug, **extra, **votes_cols, **proba_cols})
    for key in ("model", "classifier", "fusion", "stores"):
        frame[key] = run[key]
    return frame


def expand_inputs(inputs) -> tuple[list, list]:
    """Image files and folders -> the image paths to predict, as given (folders: recursive, sorted).

    Returns
    -------
    paths : list of str
        Files to predict, without duplicates, in input order.  Explicit files are tried
        whatever their extension.
    skipped : list of dict
        ``{"image": input, "reason": ...}`` for missing inputs and folders without images (logged).

    Raises
    ------
    ValueError
        When no image is left to predict.
    """
    from data.io import IMAGE_EXTENSIONS, list_images

    paths, skipped = [], []
    for item in map(str, inputs):
        p = Path(item)
        if p.is_dir():
            found = [str(f) for f in list_images(p)]
            if not found:
                skipped.append({"image": item, "reason": f"folder holds no image ({', '.join(IMAGE_EXTENSIONS)})"})
            paths.extend(found)
        elif p.exists():
            paths.append(item)
        else:
            skipped.append({"image": item, "reason": "no such file or folder"})
    for item in skipped:
        log.warning("skipped %s: %s", item["image"], item["reason"])
    if not paths:
        raise ValueError("no image to predict among the inputs: "
                         + "; ".join(f"{s['image']}: {s['reason']}" for s in skipped))
    return list(dict.fromkeys(paths)), skipped


def predict_inputs(inputs, predict_paths) -> PredictionResult:
    """:func:`expand_inputs`, then ``predict_paths(paths) -> PredictionResult``; the inputs
    skipped while listing come first in ``skipped``."""
    paths, skipped = expand_inputs(inputs)
    result = predict_paths(paths)
    result.skipped = skipped + result.skipped
    result.n_images = len(paths)
    return result


def check_predictions_out(out) -> Path:
    """Refuse, before any work, a CSV path that is a directory or whose folder cannot be made."""
    path = Path(os.path.abspath(out))
    if path.is_dir():
        raise ValueError(f"`out` {out} is a directory; give a CSV file path, e.g. {Path(out) / 'predictions.csv'}")
    parent = path.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"`out` {out}: cannot write there ({parent} is not a writable directory)")
    return path


def write_predictions(result: PredictionResult, out) -> Path:
    """``result.table`` as a CSV at ``out``, written atomically (never half a CSV)."""
    from data.files import atomic_write

    Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: result.table.to_csv(tmp, index=False))
