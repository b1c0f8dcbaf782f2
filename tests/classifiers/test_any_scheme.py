"""Issue 12: cross-validation with any classes, mapping files, patient groups; patient-level and
per-magnification accuracy; regrouped levels and cross-data-set readings."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from classifiers import CVConfig, InputDataError, build_dataset, run_cross_validation
from classifiers.evaluation.levels import level_accuracy, prediction_levels, truth_in
from classifiers.evaluation.patients import magnification_table, patient_accuracy, patient_table
from data.mapping import builtin_scheme, load_mapping, resolve_scheme
from conftest import synthetic_table

THREADS = {"n_jobs": 1}
GRADES = ("grade1", "grade2", "grade3")


def test_patient_accuracy_is_the_mean_of_patient_scores():
    truth = ["a", "a", "a", "a", "b", "b"]
    pred = ["a", "a", "a", "b", "a", "a"]
    groups = ["p1", "p1", "p1", "p1", "p2", "p2"]
    table = patient_table(truth, pred, groups)
    assert table.to_dict("records") == [{"group": "p1", "n_images": 4, "n_correct": 3, "score": 0.75},
                                        {"group": "p2", "n_images": 2, "n_correct": 0, "score": 0.0}]
    assert patient_accuracy(truth, pred, groups) == pytest.approx(0.375)  # image accuracy is 0.5
    predictions = pd.DataFrame({"truth": truth, "prediction": pred, "group": groups,
                                "magnification": ["40", "100", "40", "100", "40", "40"]})
    mags = magnification_table(predictions)
    assert mags["magnification"].tolist() == ["40", "100", "all"]
    assert mags["n_images"].tolist() == [4, 2, 6]
    assert mags["image_accuracy"].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert mags["patient_accuracy"].tolist() == pytest.approx([0.5, 0.5, 0.375])  # 40x: p1 1/1... p2 0/2
    assert magnification_table(predictions.drop(columns="magnification")).empty


def test_cv_with_arbitrary_classes_and_patient_groups():
    table = synthetic_table((12, 12, 12), classes=GRADES, patients=lambda i: f"p{i // 3:02d}", seed=3)
    dataset = build_dataset([table])  # auto: classes as found
    assert (dataset.scheme, dataset.classes, dataset.groupings) == ("classes", GRADES, [])
    result = run_cross_validation(dataset, CVConfig(n_folds=3, classifiers=("logreg",), **THREADS))
    folds = result.folds
    assert folds.groupby("group")["fold"].nunique().max() == 1  # no patient in two folds
    assert folds["group"].nunique() == 12
    from classifiers.evaluation.report import summarize

    summary = summarize(result)
    run = summary["runs"]["logreg"]["majority"]
    assert run["accuracy"] > 0.9
    predictions = result.runs[0].predictions
    assert run["patient_accuracy"] == pytest.approx(
        patient_accuracy(predictions["truth"], predictions["prediction"], predictions["group"]))
    assert run["n_patients"] == 12 and summary["label_scheme"]["classes"] == list(GRADES)
    # Pairwise rows only (no two-class grouping), the later class positive.
    assert [(r["comparison"], r["positive"]) for r in run["binary_table"]] == [
        ("grade1 vs grade2", "grade2"), ("grade1 vs grade3", "grade3"), ("grade2 vs grade3", "grade3")]


def test_mapping_file_as_scheme_and_as_regrouping(tmp_path):
    path = tmp_path / "grades.json"
    path.write_text(json.dumps({"low": ["grade1", "grade2"], "high": ["grade3"]}))
    table = synthetic_table((8, 8, 8), classes=GRADES, seed=5)
    coarse = build_dataset([table], str(path))
    assert coarse.scheme == "grades" and coarse.classes == ("low", "high")
    assert coarse.images["label"].value_counts().to_dict() == {"low": 16, "high": 8}
    fine = build_dataset([table], "classes", regroup=[str(path)])
    assert [g.name for g in fine.groupings] == ["grades"]
    result = run_cross_validation(fine, CVConfig(scheme="classes", n_folds=3, classifiers=("logreg",), **THREADS))
    from classifiers.evaluation.report import summarize

    run = summarize(result)["runs"]["logreg"]["majority"]
    predictions = result.runs[0].predictions
    low = predictions["truth"].isin(["grade1", "grade2"]) == predictions["prediction"].isin(["grade1", "grade2"])
    assert run["levels"]["grades"]["accuracy"] == pytest.approx(float(low.mean()))
    assert run["binary_table"][0]["positive"] == "high"  # the two-class grouping is the binary row
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"low": ["grade1"], "high": ["grade3"]}))
    with pytest.raises(InputDataError, match=r"bad.json' does not map class\(es\) 'grade2'"):
        build_dataset([table], "classes", regroup=[str(bad)])
    with pytest.raises(InputDataError, match=r"bad.json' leaves label\(s\) of the store\(s\) unmapped: 'grade2'"):
        build_dataset([table], str(bad))


def test_levels_read_a_bach_model_as_benign_malignant(tmp_path):
    path = tmp_path / "bach-to-breakhis.json"
    path.write_text(json.dumps({"benign": ["non-carcinoma"], "malignant": ["carcinoma"]}))
    bach4 = builtin_scheme("bach4")
    levels = prediction_levels(bach4, [builtin_scheme("bmc3"), builtin_scheme("binary")], load_mapping(path))
    assert [lv.name for lv in levels] == ["bach4", "bmc3", "binary", "bach-to-breakhis"]
    assert levels[-1].from_model == {"normal": "benign", "benign": "benign", "insitu": "malignant",
                                     "invasive": "malignant"}
    # BreakHis truth (subtypes) is read in benign / malignant through the built-in breakhis2.
    assert truth_in(["adenosis", "ductal_carcinoma"], ("benign", "malignant")).tolist() == ["benign", "malignant"]
    assert truth_in(["adenosis"], ("normal", "benign", "insitu", "invasive")) is None
    predictions = pd.DataFrame({"prediction": ["normal", "invasive", "insitu", "benign"],
                                "group": ["a", "a", "b", "b"]})
    table = level_accuracy(predictions, ["fibroadenoma", "ductal_carcinoma", "adenosis", "adenosis"], levels, bach4)
    assert table[["level", "accuracy", "patient_accuracy"]].to_dict("records") == [
        {"level": "bach-to-breakhis", "accuracy": 0.75, "patient_accuracy": 0.75}]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"x": ["grade1"], "y": ["grade2"]}))
    with pytest.raises(ValueError, match="maps neither the model's classes nor those of its groupings"):
        prediction_levels(bach4, [], load_mapping(other))


def test_auto_scheme_keeps_bach_and_reads_breakhis_as_benign_malignant():
    bach = synthetic_table((6, 6, 6, 6), seed=1)
    assert build_dataset([bach]).scheme == "bach4"
    assert resolve_scheme("auto", ["ductal_carcinoma", "adenosis"]).name == "breakhis2"


def test_ensemble_table_reads_any_scheme_through_its_groupings(tmp_path):
    from classifiers.evaluation.repeated import ensemble_markdown, ensemble_table, run_repeated_cv

    path = tmp_path / "grades.json"
    path.write_text(json.dumps({"low": ["grade1", "grade2"], "high": ["grade3"]}))
    dataset = build_dataset([synthetic_table((8, 8, 8), classes=GRADES, seed=2)], "classes", regroup=[str(path)])
    results = run_repeated_cv(dataset, CVConfig(scheme="classes", n_folds=3, classifiers=("logreg",), **THREADS),
                              [0, 1])
    table = ensemble_table(results)
    per_seed = [r.runs[0].predictions for r in results]
    low = [float((p["truth"].isin(["grade1", "grade2"]) == p["prediction"].isin(["grade1", "grade2"])).mean())
           for p in per_seed]
    assert table.loc[0, "grades_mean"] == pytest.approx(np.mean(low))
    assert table.loc[0, "classes_mean"] == pytest.approx(
        np.mean([float((p["truth"] == p["prediction"]).mean()) for p in per_seed]))
    assert "auc_high_mean" in table.columns  # the positive class of the two-class grouping
    assert "| run | stores | classes | grades | AUC high |" in ensemble_markdown(table)


def test_ensemble_table_adds_patient_level_accuracy_with_patient_groups():
    from classifiers.evaluation.repeated import ensemble_markdown, ensemble_table, run_repeated_cv

    table = synthetic_table((12, 12), classes=("benign", "malignant"), patients=lambda i: f"p{i // 4}", seed=4,
                            signal=0.8)
    dataset = build_dataset([table])
    results = run_repeated_cv(dataset, CVConfig(n_folds=3, classifiers=("logreg",), **THREADS), [0, 1])
    scores = [patient_accuracy(r.runs[0].predictions["truth"], r.runs[0].predictions["prediction"],
                               r.runs[0].predictions["group"]) for r in results]
    row = ensemble_table(results).iloc[0]
    assert row["patient_level_mean"] == pytest.approx(np.mean(scores))
    assert row["patient_level_sd_seeds"] == pytest.approx(np.std(scores, ddof=1))
    markdown = ensemble_markdown(ensemble_table(results))
    assert "| run | stores | breakhis2 | patient-level | AUC malignant |" in markdown
    assert f"{100 * np.mean(scores):.1f} ± {100 * np.std(scores, ddof=1):.1f}" in markdown
