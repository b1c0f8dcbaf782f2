"""Unit tests of classifiers/: estimators, device choice, folds, voting, metrics."""

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from classifiers.feature import estimators as models
from classifiers.evaluation.cv_dataset import InputDataError
from classifiers.evaluation.folds import assign_folds, check_fold_feasibility
from classifiers.evaluation.metrics import binary_table, per_class_table, roc_per_class, run_metrics
from classifiers.feature.estimators import (
    DeviceChoice,
    DeviceUnavailableError,
    XGBoostFeatureClassifier,
    make_classifier,
    make_logreg,
    resolve_xgboost_device,
)
from classifiers.evaluation.voting import vote


def _blobs(n_per_class=20, n_features=5, classes=("benign", "insitu", "invasive"), seed=0):
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(size=(n_per_class, n_features)) + 4 * np.eye(n_features)[i] for i in range(len(classes))])
    y = np.repeat(np.asarray(classes), n_per_class)
    return X.astype(np.float32), y


# --- estimators -------------------------------------------------------------------------------


def test_xgboost_classifier_follows_sklearn_api():
    X, y = _blobs()
    clf = XGBoostFeatureClassifier(n_estimators=30, device="cpu", n_jobs=1)
    params = clf.get_params()
    assert params["n_estimators"] == 30 and params["max_depth"] == 3 and params["n_jobs"] == 1
    fitted = clone(clf).fit(X, y)
    assert fitted.classes_.tolist() == ["benign", "insitu", "invasive"]
    proba = fitted.predict_proba(X)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (fitted.predict(X) == y).mean() == 1.0
    assert fitted.device_ == "cpu"
    assert fitted.n_features_in_ == 5


def test_xgboost_classifier_passes_sklearn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(XGBoostFeatureClassifier(n_estimators=5, device="cpu", n_jobs=1), on_fail=None)
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    assert failed == []


def test_xgboost_defaults_are_the_documented_ones():
    clf = make_classifier("xgboost", seed=7, n_jobs=2, device="cpu")
    p = clf.get_params()
    assert (p["n_estimators"], p["max_depth"], p["learning_rate"]) == (250, 3, 0.1)
    assert (p["subsample"], p["colsample_bytree"], p["random_state"], p["n_jobs"]) == (0.8, 0.8, 7, 2)


def test_xgboost_is_seeded():
    X, y = _blobs(seed=1)
    a = XGBoostFeatureClassifier(n_estimators=20, device="cpu", random_state=3, n_jobs=1).fit(X, y).predict_proba(X)
    b = XGBoostFeatureClassifier(n_estimators=20, device="cpu", random_state=3, n_jobs=1).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_estimators": 0}, "n_estimators must be an integer >= 1"),
        ({"max_depth": 2.5}, "max_depth must be an integer"),
        ({"subsample": 1.5}, r"subsample must be a number in \(0, 1\]"),
        ({"learning_rate": 0}, "learning_rate must be > 0"),
        ({"device": "gpu"}, "device must be one of"),
    ],
)
def test_xgboost_rejects_bad_params(params, message):
    X, y = _blobs(n_per_class=5)
    with pytest.raises(ValueError, match=message):
        XGBoostFeatureClassifier(**params).fit(X, y)


def test_xgboost_rejects_bad_data():
    X, y = _blobs(n_per_class=5)
    with pytest.raises(ValueError, match="one class"):
        XGBoostFeatureClassifier(device="cpu", n_jobs=1).fit(X, np.full(len(y), "benign"))
    X_nan = X.copy()
    X_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        XGBoostFeatureClassifier(device="cpu", n_jobs=1).fit(X_nan, y)
    fitted = XGBoostFeatureClassifier(n_estimators=5, device="cpu", n_jobs=1).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        fitted.predict_proba(X[:, :3])


def test_logreg_is_standardised_pipeline():
    X, y = _blobs()
    pipe = make_logreg()
    assert [name for name, _ in pipe.steps] == ["scale", "logreg"]
    assert pipe.get_params()["logreg__C"] == 0.1
    fitted = clone(pipe).fit(X * 1000.0 + 50.0, y)  # scale-free thanks to the scaler
    assert fitted.classes_.tolist() == ["benign", "insitu", "invasive"]
    assert (fitted.predict(X * 1000.0 + 50.0) == y).mean() == 1.0
    with pytest.raises(ValueError, match="C must be a positive number"):
        make_logreg(C=0)


def test_signed_sqrt_logreg_transforms_then_standardises():
    X = np.array([[4.0, -9.0, 0.0], [0.25, 1.0, -0.01]])
    root = models.SignedSquareRoot().fit(X)
    np.testing.assert_array_equal(root.transform(X), [[2.0, -3.0, 0.0], [0.5, 1.0, -0.1]])
    with pytest.raises(ValueError, match="3 features"):
        root.transform(X[:, :2])
    pipe = models.make_classifier("logreg-sqrt", seed=3)
    assert [name for name, _ in pipe.steps] == ["sqrt", "scale", "logreg"]
    assert pipe.get_params()["logreg__random_state"] == 3
    Xb, y = _blobs()
    Xb = Xb ** 3  # heavy tails: the square root must not be undone by the scaler
    fitted = clone(pipe).fit(Xb, y)
    by_hand = make_logreg(random_state=3).fit(np.sign(Xb) * np.sqrt(np.abs(Xb)), y)
    np.testing.assert_allclose(fitted.predict_proba(Xb), by_hand.predict_proba(np.sign(Xb) * np.sqrt(np.abs(Xb))))
    assert models.DEFAULT_CLASSIFIERS == ("xgboost", "logreg")  # the default CV does not grow


def test_make_classifier_unknown_name():
    with pytest.raises(ValueError, match="unknown classifier 'svm'.*xgboost.*logreg"):
        make_classifier("svm")


# --- device -----------------------------------------------------------------------------------


def test_device_auto_reports_what_it_chose():
    choice = resolve_xgboost_device("auto")
    assert choice.device in ("cpu", "cuda") and choice.reason
    # The probe reads back the device the booster really used; it agrees with a real fit.
    X, y = _blobs(n_per_class=5)
    assert XGBoostFeatureClassifier(n_estimators=2, device=choice.device, n_jobs=1).fit(X, y).device_.startswith(choice.device)


def test_device_cuda_without_gpu_raises(monkeypatch):
    monkeypatch.setattr(models, "probe_xgboost_gpu", lambda: DeviceChoice("cpu", "no visible GPU"))
    with pytest.raises(DeviceUnavailableError, match="no visible GPU.*device='auto' or 'cpu'"):
        resolve_xgboost_device("cuda")
    assert resolve_xgboost_device("auto") == DeviceChoice("cpu", "no visible GPU")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_xgboost_device("tpu")


# --- folds ------------------------------------------------------------------------------------


def test_folds_keep_patients_together_and_stratify():
    rng = np.random.default_rng(0)
    labels = np.repeat(["benign", "insitu", "invasive"], [36, 24, 30])
    # Patients of 3 images each, mixing classes, so grouping is not implied by labels.
    groups = np.array([f"p{i // 3:02d}" for i in rng.permutation(len(labels))])
    folds = assign_folds(labels, groups, n_folds=6, seed=1)
    assert set(folds) == set(range(6))
    assert pd.Series(folds).groupby(groups).nunique().max() == 1
    for k in range(6):
        assert set(groups[folds == k]).isdisjoint(groups[folds != k])
        assert set(labels[folds == k]) == {"benign", "insitu", "invasive"}
    np.testing.assert_array_equal(folds, assign_folds(labels, groups, n_folds=6, seed=1))
    assert not np.array_equal(folds, assign_folds(labels, groups, n_folds=6, seed=2))


def test_grouped_folds_is_a_splitter_giving_the_same_folds_as_ever():
    from sklearn.model_selection import cross_val_score

    from classifiers.evaluation.folds import GroupedFolds

    labels = np.array(["a"] * 8 + ["b"] * 8 + ["c"] * 8)
    groups = np.array([f"p{i // 2}" for i in range(24)])
    splitter = GroupedFolds(n_splits=4, seed=3)
    # The folds this seed named before the splitter existed (assign_folds, StratifiedGroupKFold).
    expected = [3, 3, 2, 2, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 2, 2, 0, 0, 3, 3, 1, 1]
    assert splitter.assign(labels, groups).tolist() == expected
    assert GroupedFolds(4, 0).assign(labels, groups).tolist()[:8] == [0, 0, 3, 3, 2, 2, 1, 1]
    splits = list(splitter.split(np.zeros((24, 1)), labels, groups))
    assert splitter.get_n_splits() == len(splits) == 4
    for k, (train, test) in enumerate(splits):
        assert sorted(test) == [i for i, f in enumerate(expected) if f == k]
        assert sorted(np.concatenate([train, test])) == list(range(24))
    # scikit-learn takes it as a cv= splitter.
    X = np.repeat(np.arange(3.0), 8)[:, None] + np.random.default_rng(0).normal(0, 0.1, (24, 1))
    scores = cross_val_score(make_logreg(), X, labels, groups=groups, cv=splitter)
    by_hand = [clone(make_logreg()).fit(X[train], labels[train]).score(X[test], labels[test]) for train, test in splits]
    np.testing.assert_allclose(scores, by_hand)
    assert scores.mean() > 0.9
    with pytest.raises(InputDataError, match="fewer patient groups than folds"):
        next(GroupedFolds(5).split(None, labels, groups))


def test_fold_feasibility_messages():
    labels = np.array(["a"] * 10 + ["b"] * 4)
    with pytest.raises(InputDataError, match=r"fewer images than folds \(6\): 'b': 4\. Use `n_folds=4`"):
        check_fold_feasibility(labels, [f"i{i}" for i in range(14)], 6)
    groups = [f"p{i // 2}" for i in range(14)]  # 'b' has only 2 patients
    with pytest.raises(InputDataError, match="fewer patient groups than folds.*'b': 2"):
        check_fold_feasibility(labels, groups, 3)
    with pytest.raises(InputDataError, match="integer >= 2"):
        check_fold_feasibility(labels, groups, 1)


# --- voting -----------------------------------------------------------------------------------


def test_vote_tie_break_by_hand():
    # Three classes; image 0: votes 2/2/0 tie between classes 0 and 1, class 1 has the
    # higher mean probability -> 1.  Image 1: votes 1/1/0 and equal mean probabilities of
    # the tied classes -> lowest index 0.  Image 2: 2 votes for class 0 against 1 for
    # class 2, but class 2 has the highest mean probability -> majority 0, mean-proba 2.
    row_image = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    proba = [
        [0.50, 0.40, 0.10],
        [0.50, 0.40, 0.10],
        [0.05, 0.90, 0.05],
        [0.05, 0.90, 0.05],
        [0.60, 0.40, 0.00],
        [0.40, 0.60, 0.00],
        [0.40, 0.25, 0.35],
        [0.40, 0.25, 0.35],
        [0.00, 0.05, 0.95],
    ]
    result = vote(row_image, proba)
    np.testing.assert_array_equal(result.votes, [[2, 2, 0], [1, 1, 0], [2, 0, 1]])
    np.testing.assert_allclose(result.mean_proba[0], [0.275, 0.65, 0.075])
    np.testing.assert_allclose(result.mean_proba[2], [0.80 / 3, 0.55 / 3, 1.65 / 3])
    assert result.majority.tolist() == [1, 0, 0]
    assert result.mean_proba_argmax.tolist() == [1, 0, 2]


def test_vote_rejects_missing_images():
    with pytest.raises(ValueError, match="images without any row"):
        vote([0, 2], [[1.0, 0.0], [0.0, 1.0]], n_images=3)


# --- metrics ----------------------------------------------------------------------------------

# ResNet50 confusion matrix of El Agouri et al. (2022), Table 1 (rows truth, columns prediction).
PAPER_CLASSES = ["benign", "insitu", "invasive"]
PAPER_CONFUSION = np.array([[142, 4, 6], [9, 50, 11], [12, 9, 85]])


def _from_confusion(confusion, classes):
    truth, pred = [], []
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            truth += [a] * confusion[i, j]
            pred += [b] * confusion[i, j]
    return np.array(truth), np.array(pred)


def test_binary_table_by_hand_on_paper_confusion():
    truth, pred = _from_confusion(PAPER_CONFUSION, PAPER_CLASSES)
    table = binary_table(truth, pred, PAPER_CLASSES, "bmc3").set_index("comparison")
    assert list(table.index) == [
        "carcinoma vs non-carcinoma", "benign vs insitu", "benign vs invasive", "insitu vs invasive"
    ]
    carc = table.loc["carcinoma vs non-carcinoma"]
    # carcinoma = insitu + invasive: TP = 50+11+9+85 = 155, FN = 9+12 = 21, FP = 4+6 = 10, TN = 142.
    assert (carc.tp, carc.fn, carc.fp, carc.tn) == (155, 21, 10, 142)
    assert carc.sensitivity == pytest.approx(155 / 176)
    assert carc.specificity == pytest.approx(142 / 152)
    assert carc.precision == pytest.approx(155 / 165)
    assert carc.accuracy == pytest.approx(297 / 328)
    pair = table.loc["benign vs insitu"]  # 2x2 block [[142, 4], [9, 50]], insitu positive
    assert pair.positive == "insitu" and pair.n_images == 205 and pair.n_excluded == 17
    assert pair.sensitivity == pytest.approx(50 / 59)
    assert pair.specificity == pytest.approx(142 / 146)
    assert pair.precision == pytest.approx(50 / 54)
    assert pair.accuracy == pytest.approx(192 / 205)
    last = table.loc["insitu vs invasive"]  # [[50, 11], [9, 85]], invasive positive
    assert last.sensitivity == pytest.approx(85 / 94) and last.specificity == pytest.approx(50 / 61)


def test_binary_table_in_binary_scheme_has_one_row():
    truth = np.array(["carcinoma"] * 5 + ["non-carcinoma"] * 5)
    pred = np.array(["carcinoma"] * 4 + ["non-carcinoma"] * 6)
    table = binary_table(truth, pred, ["non-carcinoma", "carcinoma"], "binary")
    assert len(table) == 1
    assert table.loc[0, "sensitivity"] == pytest.approx(0.8) and table.loc[0, "specificity"] == 1.0


def test_per_class_table_by_hand():
    truth, pred = _from_confusion(PAPER_CONFUSION, PAPER_CLASSES)
    table = per_class_table(truth, pred, PAPER_CLASSES).set_index("class")
    assert table.loc["insitu", "precision"] == pytest.approx(50 / 63)
    assert table.loc["insitu", "recall"] == pytest.approx(50 / 70)
    assert table.loc["insitu", "specificity"] == pytest.approx((328 - 70 - 13) / (328 - 70))
    assert table.loc["invasive", "support"] == 106


def test_roc_and_run_metrics_numbers():
    truth = np.array(["a", "a", "b", "b"])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    roc = roc_per_class(truth, proba, ["a", "b"])
    # 'b' scores: positives 0.7, 0.8; negatives 0.1, 0.6 -> all 4 pairs ordered -> AUC 1.
    assert roc["auc"] == {"a": 1.0, "b": 1.0} and roc["macro_auc"] == 1.0
    predictions = pd.DataFrame(
        {
            "truth": truth,
            "prediction": ["a", "b", "b", "b"],
            "prediction_mean_proba": ["a", "b", "b", "b"],
            "fold": [0, 0, 1, 1],
            "proba_a": proba[:, 0],
            "proba_b": proba[:, 1],
        }
    )
    metrics = run_metrics(predictions, ["a", "b"], "custom")
    assert metrics["majority"]["accuracy"] == 0.75
    assert metrics["majority"]["fold_accuracy"] == {"0": 0.5, "1": 1.0}  # JSON keys
    assert metrics["majority"]["fold_accuracy_sd"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert metrics["majority"]["confusion"]["counts"] == [[1, 1], [0, 2]]
