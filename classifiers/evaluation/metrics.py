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
  macro = unweighted mean over classes; each grouping of the binary table has
  its own ROC (the binary row: the summed probability of its
  positive group's classes; "A vs B": images of truth A or B, score p_B / (p_A + p_B));
* 95 % confidence intervals: percentile bootstrap over groups (patients, else
  images), 1000 resamples from a fixed-seed ``numpy.random.Generator``;
* calibration: top-label reliability of the mean probabilities (10 equal-width
  bins of the highest mean probability against the accuracy of that class) and
  the expected calibration error (ECE, bin-size weighted |accuracy - confidence|);
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
    "grouping ROC": "carcinoma vs non-carcinoma scored by the summed mean probability of the carcinoma classes; "
    "'A vs B' on the images whose truth is A or B, scored by p_B / (p_A + p_B)",
    "95% CI": "percentile bootstrap (2.5th and 97.5th percentiles) over groups (patients, else images): "
    "1000 resamples of the groups with replacement, numpy.random.default_rng(0); every image of a drawn "
    "group counts once per draw",
    "calibration": "top-label reliability: images binned by their highest mean probability (10 equal-width "
    "bins), accuracy of mean-probability voting per bin; ECE = bin-size weighted mean |accuracy - confidence|",
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
        mean probabilities; ``groupings``: AUC of each grouping of the binary table),
        ``ci95`` (:func:`bootstrap_ci`), ``calibration`` (:func:`reliability`), ``n_images``,
        ``row_accuracy``.
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
    out["roc_auc"] = {"per_class": roc["auc"], "macro": roc["macro_auc"],
                      "groupings": grouping_roc(predictions, classes, to_binary)["auc"]}
    out["ci95"] = bootstrap_ci(predictions, classes, to_binary)
    out["calibration"] = reliability(predictions, classes)
    return _clean(out)


def grouping_scores(predictions: pd.DataFrame, classes, to_binary=None) -> dict:
    """Truth and score of every grouping of the binary table, for its ROC.

    Parameters
    ----------
    predictions : pandas.DataFrame
        Per-image table with ``truth`` and ``proba_<class>``.
    classes : sequence of str
    to_binary : callable, optional
        As for :func:`binary_table` (default: BACH's carcinoma vs non-carcinoma).

    Returns
    -------
    dict
        ``{name: (rows, y_true, score)}`` with ``rows`` the boolean mask of the images used:
        the binary row (e.g. ``"carcinoma vs non-carcinoma"``, scored by the summed mean
        probability of the positive group's classes; absent when the classes are already
        that grouping's or do not map into it) on all images, and, with more than two
        classes, ``"A vs B"`` for each pair on the images whose truth is A or B, B positive,
        scored by ``p_B / (p_A + p_B)``.
    """
    classes = list(classes)
    truth = predictions["truth"].to_numpy(dtype=str)
    proba = predictions[[f"proba_{c}" for c in classes]].to_numpy(dtype=float)
    out = {}
    try:
        mapped, (negative, positive) = (to_binary or _binary_mapping)(np.asarray(classes, dtype=str))
    except ValueError:
        mapped = None
    if mapped is not None and set(mapped) == {negative, positive} and len(classes) > 2:
        cols = [j for j, m in enumerate(mapped) if m == positive]
        positives = [classes[j] for j in cols]
        out[f"{positive} vs {negative}"] = (np.ones(len(truth), bool), np.isin(truth, positives),
                                            proba[:, cols].sum(axis=1))
    if len(classes) > 2:
        for i, a in enumerate(classes):
            for j in range(i + 1, len(classes)):
                b = classes[j]
                keep = np.isin(truth, [a, b])
                pa, pb = proba[keep, i], proba[keep, j]
                total = pa + pb
                score = np.divide(pb, total, out=np.full_like(pb, 0.5), where=total > 0)
                out[f"{a} vs {b}"] = (keep, truth[keep] == b, score)
    return out


def grouping_roc(predictions: pd.DataFrame, classes, to_binary=None) -> dict:
    """ROC curve and AUC of every grouping of :func:`grouping_scores`.

    Returns
    -------
    dict
        ``{"curves": {name: (fpr, tpr)}, "auc": {name: auc}}``; a grouping with one class only
        has no curve and AUC NaN.
    """
    curves, auc = {}, {}
    for name, (_, y, score) in grouping_scores(predictions, classes, to_binary).items():
        if y.all() or not y.any():
            auc[name] = float("nan")
            continue
        fpr, tpr, _ = roc_curve(y, score)
        curves[name] = (fpr, tpr)
        auc[name] = float(roc_auc_score(y, score))
    return {"curves": curves, "auc": auc}


def reliability(predictions: pd.DataFrame, classes, n_bins: int = 10) -> dict:
    """Top-label reliability of the mean probabilities (see the module docstring).

    Returns
    -------
    dict
        ``bins``: per non-empty bin ``lower``, ``upper``, ``n``, ``confidence`` (mean highest
        probability) and ``accuracy``; ``ece``.
    """
    proba = predictions[[f"proba_{c}" for c in classes]].to_numpy(dtype=float)
    confidence = proba.max(axis=1)
    correct = np.asarray(classes)[proba.argmax(axis=1)] == predictions["truth"].to_numpy(dtype=str)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for k in range(n_bins):
        inside = index == k
        if not inside.any():
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        bins.append({"lower": float(edges[k]), "upper": float(edges[k + 1]), "n": int(inside.sum()),
                     "confidence": conf, "accuracy": acc})
        ece += inside.mean() * abs(acc - conf)
    return {"bins": bins, "ece": float(ece)}


#: Resamples and seed of the bootstrap confidence intervals (stated in the report).
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def weighted_auc(y, score, weights) -> np.ndarray:
    """ROC AUC of ``score`` for the boolean ``y`` under each row of ``weights``.

    Equals ``roc_auc_score(y, score, sample_weight=w)`` for every row ``w``; written with one
    sort for all rows because scikit-learn's validation costs about a millisecond per call,
    times thousands of bootstrap resamples per run.

    Parameters
    ----------
    y : ndarray of bool, shape (n,)
    score : ndarray, shape (n,)
    weights : ndarray, shape (n_resamples, n)

    Returns
    -------
    ndarray, shape (n_resamples,)
        NaN where a resample has no positive or no negative weight.
    """
    y = np.asarray(y, dtype=bool)
    order = np.argsort(score, kind="mergesort")
    sorted_score = np.asarray(score, dtype=float)[order]
    w, y = np.asarray(weights, dtype=float)[:, order], y[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])  # tied scores
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    numerator = (pos * (below + 0.5 * neg)).sum(axis=1)
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def bootstrap_ci(predictions: pd.DataFrame, classes, to_binary=None, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict:
    """Percentile-bootstrap confidence intervals of accuracy and AUC.

    Groups (patients; each image is its own group without them) are drawn with replacement, so
    images of one patient stay together as in the folds.  A draw is expressed as integer
    weights on the images (how often their group was drawn), which scikit-learn's AUC takes
    as ``sample_weight``.

    Parameters
    ----------
    predictions : pandas.DataFrame
        Per-image table (``truth``, ``prediction``, ``prediction_mean_proba``, ``proba_<class>``,
        and ``group``; without it every image is its own group).
    classes : sequence of str
    to_binary : callable, optional
        The binary row's mapping, as for :func:`grouping_scores`.
    n_resamples : int, default=1000
    seed : int, default=0
        Seeds ``numpy.random.default_rng``: the same predictions give the same intervals.
    level : float, default=0.95

    Returns
    -------
    dict
        ``{metric: [low, high]}`` for ``accuracy_majority``, ``accuracy_mean_proba``,
        ``macro_auc``, ``auc <class>`` and ``auc <grouping>``; NaN where undefined in over half
        of the resamples.
    """
    classes = list(classes)
    rng = np.random.default_rng(seed)
    groups = predictions["group"] if "group" in predictions else pd.Series(np.arange(len(predictions)))
    _, group_index = np.unique(groups.astype(str).to_numpy(), return_inverse=True)
    n_groups = int(group_index.max()) + 1
    # (n_resamples, n_groups) draw counts -> per-image weights.
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)
    weights = counts[:, group_index].astype(float)
    truth = predictions["truth"].to_numpy(dtype=str)
    proba = predictions[[f"proba_{c}" for c in classes]].to_numpy(dtype=float)
    samples = {}
    for key, column in (("accuracy_majority", "prediction"), ("accuracy_mean_proba", "prediction_mean_proba")):
        correct = (predictions[column].to_numpy(dtype=str) == truth).astype(float)
        samples[key] = weights @ correct / weights.sum(axis=1)
    per_class = np.stack([weighted_auc(truth == c, proba[:, j], weights) for j, c in enumerate(classes)], axis=1)
    with np.errstate(all="ignore"):
        defined = ~np.isnan(per_class)
        samples["macro_auc"] = np.where(defined.any(axis=1),
                                        np.nansum(per_class, axis=1) / np.maximum(defined.sum(axis=1), 1), np.nan)
    for j, c in enumerate(classes):
        samples[f"auc {c}"] = per_class[:, j]
    for name, (rows, y, score) in grouping_scores(predictions, classes, to_binary).items():
        samples[f"auc {name}"] = weighted_auc(y, score, weights[:, rows])
    alpha = (1.0 - level) / 2
    out = {}
    for key, values in samples.items():
        values = np.asarray(values, dtype=float)
        finite = values[~np.isnan(values)]
        if len(finite) * 2 < len(values):
            out[key] = [float("nan"), float("nan")]
        else:
            out[key] = [float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))]
    return _clean(out)
