"""Cross-validation, fusion, label schemes, bad input and the report files, on synthetic stores."""

import json
import statistics

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from classifiers.evaluation import cross_validation as experiment
from classifiers.evaluation.cv_dataset import InputDataError, build_dataset
from classifiers.evaluation.cross_validation import CVConfig, fit_run_model, plan_runs, run_cross_validation
from classifiers.evaluation.report import write_report
from features.store import FeatureTable
from conftest import BACH4, synthetic_table, write_store

LOGREG = CVConfig(classifiers=("logreg",))  # the fast classifier, for tests about plumbing
# One XGBoost thread in tests: the 2 cores are shared, and OpenMP threads stall badly when
# oversubscribed; the production default stays n_jobs=2.
THREADS = {"n_jobs": 1}


def _cv(tables, config):
    return run_cross_validation(build_dataset(tables, config.scheme), config)


def _run(result, name):
    return next(r for r in result.runs if r.spec.name == name)


# --- accuracy on separable and on random features --------------------------------------------


def test_separable_features_give_near_perfect_accuracy():
    result = _cv([synthetic_table()], CVConfig(n_folds=6, seed=0, **THREADS))
    assert [r.spec.name for r in result.runs] == ["xgboost", "logreg"]
    for run in result.runs:
        predictions = run.predictions
        assert len(predictions) == 48
        assert (predictions["truth"] == predictions["prediction"]).mean() >= 0.95, run.spec.name


def test_random_features_give_chance_accuracy():
    # 4 balanced classes, 120 images, pure noise.  Under the null each image is right with
    # p = 1/4, so the accuracy has sd sqrt(p(1-p)/n) = 0.040; 3.5 sd (0.14) bounds a
    # two-sided false alarm at ~5e-4 while still catching leakage or label bugs, which give
    # accuracies far above 0.39.
    table = synthetic_table((30, 30, 30, 30), signal=0.0, seed=3)
    result = _cv([table], CVConfig(classifiers=("xgboost", "logreg"), n_folds=6, seed=3, **THREADS))
    for run in result.runs:
        accuracy = (run.predictions["truth"] == run.predictions["prediction"]).mean()
        assert abs(accuracy - 0.25) <= 0.14, (run.spec.name, accuracy)


# --- grouping -----------------------------------------------------------------------------------


def test_no_group_or_image_is_split_between_train_and_test(monkeypatch):
    # Patients of 3 images each, drawn across classes.
    assign = np.random.default_rng(5).permutation(72)
    table = synthetic_table((18, 18, 18, 18), patients=lambda i: f"patient-{assign[i] // 3:02d}")
    dataset = build_dataset([table], "bach4")
    assert dataset.images["group"].nunique() == 24
    train_calls = []
    real_fit = experiment.fit_run_model

    def spy(dataset_, spec, config, rows=None, device=None):
        train_calls.append(np.asarray(rows))
        return real_fit(dataset_, spec, config, rows=rows, device=device)

    monkeypatch.setattr(experiment, "fit_run_model", spy)
    result = run_cross_validation(dataset, CVConfig(classifiers=("logreg",), n_folds=6, seed=2))
    assert len(train_calls) == 6
    meta = dataset.meta
    for rows in train_calls:
        test = np.setdiff1d(np.arange(len(meta)), rows)
        assert set(meta["group"].iloc[rows]).isdisjoint(meta["group"].iloc[test])
        assert set(meta["image_id"].iloc[rows]).isdisjoint(meta["image_id"].iloc[test])
    # Every image: one fold, all 4 augmentations voted in it.
    predictions = result.runs[0].predictions
    assert (predictions[[f"votes_{c}" for c in BACH4]].sum(axis=1) == 4).all()
    row_folds = result.folds["fold"].to_numpy()[dataset.row_image]
    assert pd.Series(row_folds).groupby(meta["image_id"].to_numpy()).nunique().max() == 1
    assert result.folds.groupby("group")["fold"].nunique().max() == 1


# --- label schemes ----------------------------------------------------------------------------


def test_bach4_store_reported_as_binary_gives_2x2_confusion(tmp_path):
    table = synthetic_table((8, 10, 12, 14))
    result = _cv([table], CVConfig(scheme="binary", classifiers=("logreg",), n_folds=4))
    assert result.dataset.classes == ("non-carcinoma", "carcinoma")
    summary = write_report(result, tmp_path)["summary"]
    counts = np.array(summary["runs"]["logreg"]["majority"]["confusion"]["counts"])
    assert counts.shape == (2, 2)
    assert counts.sum(axis=1).tolist() == [18, 26]  # normal+benign, insitu+invasive
    assert summary["images_per_class"] == {"non-carcinoma": 18, "carcinoma": 26}


def test_bach4_store_reported_as_bmc3_merges_normal_into_benign():
    dataset = build_dataset([synthetic_table((8, 10, 12, 14))], "bmc3")
    assert dataset.classes == ("benign", "insitu", "invasive")
    assert dataset.images["label"].value_counts().to_dict() == {"benign": 18, "invasive": 14, "insitu": 12}
    assert set(dataset.meta["source_label"]) == set(BACH4)


def test_absent_class_is_reported_not_modelled():
    dataset = build_dataset([synthetic_table((8, 8, 0, 8))], "bach4")
    assert dataset.classes == ("normal", "benign", "invasive")
    assert dataset.absent_classes == ("insitu",)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="unknown classifier 'svm'"):
        CVConfig(classifiers=("svm",)).validate()
    with pytest.raises(ValueError, match="unknown fusion 'max'"):
        CVConfig(fusion=("max",)).validate()
    with pytest.raises(ValueError, match="n_folds must be an integer >= 2"):
        CVConfig(n_folds=1).validate()


# --- fusion -----------------------------------------------------------------------------------


def test_fusion_concat_and_mean_proba():
    a = synthetic_table(backbone="resnet50", seed=1, n_features=8)
    b = synthetic_table(backbone="xception", seed=2, n_features=6)
    # The second store's rows come in another order and other images' features are
    # unrelated, so alignment must use (image_id, aug), not row order.
    dataset = build_dataset([a, b], "bach4")
    assert dataset.store_names == ["resnet50", "xception"]
    result = run_cross_validation(dataset, CVConfig(classifiers=("logreg",), n_folds=4, seed=0))
    names = [r.spec.name for r in result.runs]
    assert names == ["logreg-concat", "logreg-mean-proba", "logreg-resnet50", "logreg-xception"]
    mean = _run(result, "logreg-mean-proba").row_proba
    np.testing.assert_allclose(
        mean, (_run(result, "logreg-resnet50").row_proba + _run(result, "logreg-xception").row_proba) / 2
    )
    for run in result.runs:
        assert (run.predictions["truth"] == run.predictions["prediction"]).mean() >= 0.95, run.spec.name
    # The final model on all data is one call; concat sees both stores' features.
    concat = fit_run_model(dataset, plan_runs(2, dataset.store_names, LOGREG)[0], LOGREG)
    assert concat.estimators[0].n_features_in_ == 14
    assert concat.predict_proba(dataset.X).shape == (len(dataset.meta), 4)


def test_fusion_aligns_rows_on_image_and_augmentation():
    a = synthetic_table(seed=1)
    b = FeatureTable(a.meta.iloc[::-1].reset_index(drop=True), 2 * a.X[::-1], {"backbone": "twice"})
    dataset = build_dataset([a, b], "bach4")
    np.testing.assert_array_equal(dataset.X[1], 2 * dataset.X[0])
    assert dataset.store_names == ["synthetic", "twice"]


# --- bad input --------------------------------------------------------------------------------


def test_store_with_one_class_is_an_error():
    table = synthetic_table((0, 0, 0, 10))
    with pytest.raises(InputDataError, match=r"only one class \(invasive\).*at least two classes"):
        build_dataset([table], "bach4")
    # A bach4 store of normal+benign images is one class once reported as binary.
    with pytest.raises(InputDataError, match=r"only one class \(non-carcinoma\) in scheme 'binary'"):
        build_dataset([synthetic_table((6, 6, 0, 0))], "binary")


def test_class_with_fewer_groups_than_folds_fails_before_training(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(experiment, "fit_run_model", no_training)
    table = synthetic_table((10, 10, 3, 10))
    with pytest.raises(InputDataError, match=r"fewer images than folds \(6\): 'insitu': 3\. Use `n_folds=3`"):
        _cv([table], CVConfig(n_folds=6))
    # Grouping by patient counts patients, not images.
    table = synthetic_table((12, 12, 12, 12), patients=lambda i: f"p{i // 4}")
    with pytest.raises(InputDataError, match="fewer patient groups than folds.*'normal': 3"):
        _cv([table], CVConfig(n_folds=6))


def test_stores_not_covering_the_same_images_is_an_error():
    a = synthetic_table(backbone="resnet50")
    keep = ~a.meta["image_id"].isin(["benign-003", "insitu-007"])
    b = FeatureTable(a.meta[keep].reset_index(drop=True), a.X[keep.to_numpy()], {"backbone": "xception"})
    with pytest.raises(
        InputDataError,
        match=r"'resnet50' and 'xception' do not cover the same images: 2 image\(s\) only in 'resnet50': "
        r"benign-003, insitu-007\. Extract every backbone from the same manifest",
    ):
        build_dataset([a, b], "bach4")
    fewer_augs = a.meta["aug"] < 3
    c = FeatureTable(a.meta[fewer_augs].reset_index(drop=True), a.X[fewer_augs.to_numpy()], {"backbone": "x"})
    with pytest.raises(InputDataError, match="different augmentations for images .*same augmentation count"):
        build_dataset([a, c], "bach4")


def test_labels_that_cannot_be_mapped_are_an_error():
    table = synthetic_table((6, 6, 6), classes=("benign", "insitu", "invasive"))  # bmc3 labels
    with pytest.raises(InputDataError, match="cannot be reported in scheme 'bach4'"):
        build_dataset([table], "bach4")


# --- report files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A bmc3 report of both classifiers on weakly separable data (so there are errors)."""
    out = tmp_path_factory.mktemp("report")
    table = synthetic_table((9, 12, 12, 12), signal=1.2, seed=11, patients=lambda i: f"p{i // 2:02d}")
    result = _cv([table], CVConfig(scheme="bmc3", n_folds=5, seed=4, **THREADS))
    written = write_report(result, out)
    return out, result, written


def test_report_files_exist(report):
    out, result, written = report
    expected = ["metrics.json", "predictions.csv", "folds.csv", "fold_accuracy.csv", "summary.csv", "methods.txt",
                "report.html"]
    for name in expected:
        assert (out / name).is_file(), name
    for run in ("xgboost", "logreg"):
        for name in ("confusion.csv", "confusion_mean_proba.csv", "confusion.png", "per_class.csv",
                     "binary_table.csv", "roc.png", "levels.csv", "roc_groupings.png", "calibration.png",
                     "errors.csv"):
            assert (out / run / name).stat().st_size > 0, (run, name)
    assert (out / "xgboost" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(written["files"]) == 7 + 2 * 10
    # bmc3 is also read as carcinoma vs non-carcinoma: the accuracy of the mapped predictions.
    levels = pd.read_csv(out / "xgboost" / "levels.csv")
    predictions = result.runs[0].predictions
    carcinoma = ~predictions["truth"].eq("benign")
    expected = float((carcinoma == ~predictions["prediction"].eq("benign")).mean())
    assert levels.to_dict("records") == [{"level": "binary", "classes": "non-carcinoma, carcinoma",
                                          "accuracy": pytest.approx(expected)}]


def test_report_numbers_match_predictions(report):
    out, result, _ = report
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv")
    classes = ["benign", "insitu", "invasive"]
    assert metrics["classes"] == classes and metrics["n_images"] == 45
    assert metrics["device"]["xgboost"] in ("cpu", "cuda") and metrics["device"]["reason"]
    fold_table = pd.read_csv(out / "fold_accuracy.csv", index_col=0)
    for name in ("xgboost", "logreg"):
        pred = predictions[predictions["model"] == name]
        assert len(pred) == 45 and (pred["classifier"] == name).all()
        run = metrics["runs"][name]
        correct = pred["truth"] == pred["prediction"]
        assert run["majority"]["accuracy"] == pytest.approx(correct.mean())
        assert run["mean_proba"]["accuracy"] == pytest.approx((pred["truth"] == pred["prediction_mean_proba"]).mean())
        per_fold = correct.groupby(pred["fold"]).mean()
        assert [run["majority"]["fold_accuracy"][str(k)] for k in range(5)] == pytest.approx(per_fold.tolist())
        assert run["majority"]["fold_accuracy_sd"] == pytest.approx(statistics.stdev(per_fold))
        assert fold_table.loc["mean", name] == pytest.approx(per_fold.mean())
        # Confusion: rows truth, columns predicted.
        confusion = pd.read_csv(out / name / "confusion.csv", index_col=0)
        expected = pd.crosstab(pred["truth"], pred["prediction"]).reindex(index=classes, columns=classes, fill_value=0)
        np.testing.assert_array_equal(confusion.to_numpy(), expected.to_numpy())
        # Binary table by hand: carcinoma = insitu or invasive.
        table = pd.read_csv(out / name / "binary_table.csv").set_index("comparison")
        truth_c = pred["truth"] != "benign"
        pred_c = pred["prediction"] != "benign"
        assert table.loc["carcinoma vs non-carcinoma", "sensitivity"] == pytest.approx((truth_c & pred_c).sum() / truth_c.sum())
        assert table.loc["carcinoma vs non-carcinoma", "specificity"] == pytest.approx((~truth_c & ~pred_c).sum() / (~truth_c).sum())
        pair = pred[pred["truth"].isin(["benign", "insitu"]) & pred["prediction"].isin(["benign", "insitu"])]
        tp = ((pair["truth"] == "insitu") & (pair["prediction"] == "insitu")).sum()
        assert table.loc["benign vs insitu", "positive"] == "insitu"
        assert table.loc["benign vs insitu", "sensitivity"] == pytest.approx(tp / (pair["truth"] == "insitu").sum())
        assert table.loc["benign vs insitu", "precision"] == pytest.approx(tp / (pair["prediction"] == "insitu").sum())
        # Per-class specificity and AUC from the image-level mean probabilities.
        per_class = pd.read_csv(out / name / "per_class.csv").set_index("class")
        neg = pred["truth"] != "invasive"
        assert per_class.loc["invasive", "specificity"] == pytest.approx((neg & (pred["prediction"] != "invasive")).sum() / neg.sum())
        auc = roc_auc_score(pred["truth"] == "insitu", pred["proba_insitu"])
        assert run["roc_auc"]["per_class"]["insitu"] == pytest.approx(auc)
        # Votes add up to the augmentations, mean probabilities to one.
        assert (pred[[f"votes_{c}" for c in classes]].sum(axis=1) == pred["n_aug"]).all()
        np.testing.assert_allclose(pred[[f"proba_{c}" for c in classes]].sum(axis=1), 1.0, rtol=1e-6)
    folds = pd.read_csv(out / "folds.csv")
    assert folds.groupby("group")["fold"].nunique().max() == 1
    merged = predictions.merge(folds, on="image_id", suffixes=("", "_f"))
    assert (merged["fold"] == merged["fold_f"]).all()


def test_report_html_is_self_contained(report):
    out, _, _ = report
    page = (out / "report.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert page.count("data:image/png;base64,") == 8  # confusion, ROC, grouping ROC, calibration per run
    assert "http://" not in page and "https://" not in page
    assert "<table" in page and "carcinoma vs non-carcinoma" in page
    assert f"{metrics['runs']['xgboost']['majority']['accuracy']:.3f}" in page


# --- command line -----------------------------------------------------------------------------


def test_cli_runs_on_written_stores(tmp_path, capsys):
    from pipeline.cv_report import main

    a = write_store(tmp_path / "stores", synthetic_table(seed=1), "resnet50")
    b = write_store(tmp_path / "stores", synthetic_table(seed=2, n_features=6), "xception")
    out = tmp_path / "report"
    written = main(["--features", str(a), str(b), "--out", str(out), "--labels", "binary", "--folds", "4",
                    "--classifier", "logreg", "--fusion", "concat,mean-proba", "--seed", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(written["summary"]))
    assert metrics["config"] == {"scheme": "binary", "n_folds": 4, "classifiers": ["logreg"],
                                 "fusion": ["concat", "mean-proba"], "seed": 1, "n_jobs": 2,
                                 "device_requested": "auto", "tune": False}
    assert [s["backbone"] for s in metrics["stores"]] == ["resnet50", "xception"]
    assert set(metrics["runs"]) == {"logreg-concat", "logreg-mean-proba", "logreg-resnet50", "logreg-xception"}
    assert metrics["runs"]["logreg-concat"]["majority"]["accuracy"] >= 0.95
    assert (out / "report.html").is_file()
    # The last line printed says what to open; the Methods state this very command.
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {(out / 'report.html').resolve()}"
    command = metrics["methods"]["command"]
    assert command.startswith(f"python -m pipeline.cv_report --features {a} {b} --out {out} --labels binary")
    assert "--seed 1" in command and command in (out / "report.html").read_text()


def test_cli_input_error_exits_with_message(tmp_path, capsys):
    from pipeline.cv_report import main

    a = write_store(tmp_path / "stores", synthetic_table((3, 3, 3, 3)), "resnet50")
    with pytest.raises(SystemExit) as exit_info:
        main(["--features", str(a), "--out", str(tmp_path / "r"), "--classifier", "logreg"])
    assert exit_info.value.code == 2
    assert "fewer images than folds (6)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--features", str(a), "--out", str(tmp_path / "r"), "--classifier", "svm"])
    assert "invalid choice 'svm'" in capsys.readouterr().err
