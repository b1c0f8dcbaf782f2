"""Image-level metrics of a cross-validated run.

Conventions (also written into the report):

* per-fold accuracy: accuracy of the images of each test fold; the spread is
  the sample standard deviation over folds (``ddof=1``);
* confusion matrix: counts, rows = truth, columns = prediction, classes in
  scheme order;
* specificity of class c = TN / (TN + FP) with c against the rest;
* binary table (El Agouri et al. 2022, Table 1): "carcinoma vs
  non-carcinoma" maps truth and prediction to the binary scheme, positive =
  carcinoma; "A vs B" for each pair of classes (A before B in scheme order)
  uses the 2x2 block of the confusion matrix -- images whose truth *and*
  prediction are A or B -- with **B positive** (the later, more malignant
  class in bach4/bmc3 order); images predicted as a third class are left out
  and counted in ``n_excluded``;
* ROC / AUC: one-vs-rest per class from the image-level mean probabilities,
  macro = unweighted mean over classes;
* any scheme: the binary row is the first two-class grouping of the scheme
  (bach4/bmc3 -> carcinoma vs non-carcinoma, BreakHis subtypes -> malignant vs
  benign, a ``--regroup`` mapping file), its second class positive; every
  grouping's accuracy is in ``levels``;
* patient-level accuracy (Spanhol et al. 2016): mean over patients (CV groups)
  of each patient's image accuracy; per magnification when images have one.

Undefined ratios (0/0) are NaN (``null`` in JSON).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


#: Short statements of the conventions, copied into metrics.json and report.html.
METRIC_CONVENTIONS = {
    "majority voting": "each augmentation votes for its argmax class; the image takes the class with most "
    "votes; ties go to the tied class with the highest mean probability, then to the lowest class index",
    "mean-probability voting": "the class with the highest mean probability over the image's augmentations "
    "(ties: lowest class index)",
    "per-fold accuracy": "image-level accuracy of each test fold; sd is the sample sd over folds (ddof=1)",
    "confusion matrix": "counts of images, rows = truth, columns = prediction, classes in scheme order",
    "specificity": "TN / (TN + FP) of the class against all other classes",
    "carcinoma vs non-carcinoma": "truth and prediction mapped to the binary scheme; positive = carcinoma",
    "pairwise comparison 'A vs B'": "2x2 block of the confusion matrix (images whose truth and prediction "
    "are both A or B); B, the later class in scheme order (the more malignant in bach4/bmc3), is positive; "
    "images of A or B predicted as a third class are excluded and counted in n_excluded",
    "ROC/AUC": "one-vs-rest per class from image-level mean probabilities; macro = unweighted mean over classes",
    "patient-level accuracy": "mean over patients (the CV groups) of each patient's image accuracy (patient "
    "recognition rate of Spanhol et al. 2016); image-level accuracy is over all images",
    "regrouped accuracy": "truth and prediction mapped into each coarser grouping of the scheme (bach4 -> bmc3, "
    "binary; BreakHis subtypes -> benign/malignant; --regroup mapping files)",
    "undefined ratios": "0/0 is reported as n/a (null in JSON)",
}


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def fold_accuracy(predictions: pd.DataFrame, column: str = "prediction") -> pd.Series:
    """Accuracy of each test fold (index = fold)."""
    correct = predictions["truth"].to_numpy() == predictions[column].to_numpy()
    return pd.Series(correct).groupby(predictions["fold"].to_numpy()).mean().rename("accuracy")


def per_class_table(truth, pred, classes) -> pd.DataFrame:
    """Precision, recall (sensitivity), specificity, F1 and support per class."""
    classes = list(classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, pred, labels=classes, zero_division=np.nan
    )
    mcm = multilabel_confusion_matrix(truth, pred, labels=classes)  # [[tn, fp], [fn, tp]]
    specificity = [_ratio(m[0, 0], m[0, 0] + m[0, 1]) for m in mcm]
    return pd.DataFrame(
        {
            "class": classes,
            "precision": precision,
            "recall": recall,
            "specificity": specificity,
            "f1": f1,
            "support": support.astype(int),
        }
    )


def _binary_row(comparison: str, truth, pred, negative: str, positive: str, n_excluded: int = 0) -> dict:
    if len(truth) == 0:  # no image of the pair was predicted as either class (sklearn refuses empty input)
        tn = fp = fn = tp = 0
    else:
        tn, fp, fn, tp = confusion_matrix(truth, pred, labels=[negative, positive]).ravel()
    return {
        "comparison": comparison,
        "positive": positive,
        "negative": negative,
        "n_images": int(tn + fp + fn + tp),
        "n_excluded": int(n_excluded),
        "tp": int(tp),
        "fn": int(fn),
        "fp": int(fp),
        "tn": int(tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }


def binary_table(truth, pred, classes, scheme: str, to_binary=None) -> pd.DataFrame:
    """The binary comparisons of El Agouri et al. (2022), Table 1.

    Parameters
    ----------
    truth, pred : array-like of str
        Image-level true and predicted classes.
    classes : sequence of str
        Classes in scheme order.
    scheme : str
        Scheme of ``truth``/``pred``.
    to_binary : callable, optional
        ``labels -> (mapped labels, (negative, positive))`` mapping into the
        binary scheme; by default :func:`data.labels.map_labels` with the
        binary scheme's class order (non-carcinoma, carcinoma).  When the
        mapping is impossible the carcinoma row is omitted.

    Returns
    -------
    pandas.DataFrame
        One row per comparison: counts, sensitivity, specificity, precision,
        accuracy, and which class is positive.
    """
    truth, pred, classes = np.asarray(truth, dtype=str), np.asarray(pred, dtype=str), list(classes)
    rows = []
    if to_binary is None:
        to_binary = _binary_mapping
    try:
        mapped_truth, (negative, positive) = to_binary(truth)
        mapped_pred, _ = to_binary(pred)
    except ValueError:
        mapped_truth = None
    if mapped_truth is not None:
        rows.append(_binary_row(f"{positive} vs {negative}", mapped_truth, mapped_pred, negative, positive))
    if scheme != "binary" or mapped_truth is None:
        for i, a in enumerate(classes):
            for b in classes[i + 1 :]:
                in_truth = np.isin(truth, [a, b])
                keep = in_truth & np.isin(pred, [a, b])
                rows.append(
                    _binary_row(f"{a} vs {b}", truth[keep], pred[keep], a, b, int((in_truth & ~keep).sum()))
                )
    return pd.DataFrame(rows)


def _binary_mapping(labels):
    from data import labels as label_api

    negative, positive = tuple(label_api.class_names("binary"))
    return np.asarray(label_api.map_labels(np.asarray(labels, dtype=str), "binary"), dtype=str), (negative, positive)


def roc_per_class(truth, mean_proba, classes) -> dict:
    """One-vs-rest ROC curves and AUC per class, plus the macro AUC.

    Returns
    -------
    dict
        ``{"curves": {class: (fpr, tpr)}, "auc": {class: auc}, "macro_auc": float}``;
        a class without positives or negatives has no curve and AUC NaN.
    """
    truth, proba = np.asarray(truth, dtype=str), np.asarray(mean_proba, dtype=float)
    curves, auc = {}, {}
    for j, c in enumerate(classes):
        y = truth == c
        if y.all() or not y.any():
            auc[c] = float("nan")
            continue
        fpr, tpr, _ = roc_curve(y, proba[:, j])
        curves[c] = (fpr, tpr)
        auc[c] = float(roc_auc_score(y, proba[:, j]))
    values = [v for v in auc.values() if not np.isnan(v)]
    return {"curves": curves, "auc": auc, "macro_auc": float(np.mean(values)) if values else float("nan")}


def _clean(value):
    """JSON-safe copy: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    return value


def grouping_to_binary(groupings):
    """``to_binary`` for :func:`binary_table` from the first two-class grouping (None: no row)."""
    for g in groupings:
        if len(g.classes) == 2:
            return lambda labels, g=g: (np.asarray(g.map(labels), dtype=str), tuple(g.classes))

    def none(labels):
        raise ValueError("no two-class grouping")
    return none


def run_metrics(predictions: pd.DataFrame, classes, scheme: str, row_accuracy: float | None = None,
                groupings=None) -> dict:
    """All image-level metrics of one run, JSON-ready.

    Parameters
    ----------
    predictions : pandas.DataFrame
        Per-image table from :func:`classifiers.evaluation.cross_validation.image_predictions`.
    classes : sequence of str
        Classes in scheme order.
    scheme : str
    row_accuracy : float, optional
        Accuracy of single augmentations before voting (a diagnostic).
    groupings : list of data.mapping.LabelScheme, optional
        Coarser schemes (``CVDataset.groupings``); default: BACH's binary scheme when the
        classes map into it.

    Returns
    -------
    dict
        Keys ``majority`` and ``mean_proba`` (one per voting rule: accuracy,
        balanced accuracy, per-fold accuracy, mean and sd, confusion, per
        class table, binary table), ``roc_auc`` (per class and macro, from
        mean probabilities), ``n_images``, ``row_accuracy``.
    """
    from classifiers.evaluation.patients import magnification_table, patient_accuracy

    classes = list(classes)
    truth = predictions["truth"].to_numpy(dtype=str)
    out = {"n_images": int(len(predictions)), "row_accuracy": row_accuracy}
    to_binary = None if groupings is None else grouping_to_binary(groupings)
    for key, column in (("majority", "prediction"), ("mean_proba", "prediction_mean_proba")):
        pred = predictions[column].to_numpy(dtype=str)
        folds = fold_accuracy(predictions, column)
        out[key] = {
            "accuracy": float(accuracy_score(truth, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(truth, pred)),
            "fold_accuracy": {int(k): float(v) for k, v in folds.items()},
            "fold_accuracy_mean": float(folds.mean()),
            "fold_accuracy_sd": float(folds.std(ddof=1)) if len(folds) > 1 else float("nan"),
            "confusion": {
                "labels": classes,
                "counts": confusion_matrix(truth, pred, labels=classes).tolist(),
            },
            "per_class": per_class_table(truth, pred, classes).to_dict(orient="records"),
            "binary_table": binary_table(truth, pred, classes, scheme, to_binary).to_dict(orient="records"),
            "levels": {g.name: {"classes": list(g.classes), "accuracy": float(np.mean(g.map(truth) == g.map(pred)))}
                       for g in (groupings or [])},
        }
        if "group" in predictions.columns:
            out[key]["patient_accuracy"] = patient_accuracy(truth, pred, predictions["group"].to_numpy(dtype=str))
            out[key]["n_patients"] = int(predictions["group"].nunique())
        mags = magnification_table(predictions, column)
        if len(mags):
            out[key]["magnification"] = mags.to_dict(orient="records")
    roc = roc_per_class(truth, predictions[[f"proba_{c}" for c in classes]].to_numpy(), classes)
    out["roc_auc"] = {"per_class": roc["auc"], "macro": roc["macro_auc"]}
    return _clean(out)
