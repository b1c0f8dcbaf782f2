"""Issue 12 as a user runs it: BreakHis and the user's own classes through extract -> cv_report ->
train -> predict, a mapping file, cross-data-set prediction, and bad input refused before work."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import TINY_PROTOCOL
from data.synthetic import write_breakhis
from pipeline import cv_report as cv_cli
from pipeline import extract as extract_cli
from pipeline import predict as predict_cli
from pipeline import train as train_cli

TINY = ["--weights", "none", "--augmentations", str(TINY_PROTOCOL["augmentations"]),
        "--crops", str(TINY_PROTOCOL["crops"]), "--crop-size", str(TINY_PROTOCOL["crop_size"]),
        "--scale", str(TINY_PROTOCOL["scale"]), "--stain-reference", "none", "--quiet"]
FAST = ["--classifier", "logreg", "--folds", "3", "--n-jobs", "1"]


@pytest.fixture(scope="module")
def breakhis(tmp_path_factory):
    root = tmp_path_factory.mktemp("bh")
    tree = write_breakhis(root, patients_per_subtype=2, magnifications=("40", "100"), size=(64, 96))
    assert extract_cli.main(["--data", str(tree), "--out", str(root / "features"), *TINY]) == 0
    return tree, root / "features"


def test_breakhis_extract_report_train_predict(breakhis, tmp_path, capsys):
    tree, features = breakhis
    out = tmp_path / "report"
    assert cv_cli.main(["--features", str(features), "--out", str(out), *FAST]) is not None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["benign", "malignant"] and metrics["label_scheme"]["name"] == "breakhis2"
    folds = pd.read_csv(out / "folds.csv", dtype=str)
    assert folds.groupby("group")["fold"].nunique().max() == 1  # no patient in two folds
    assert folds["group"].nunique() == 15  # 16 slides; 14-22549AB and 14-22549CD are one patient
    run = metrics["runs"]["logreg"]["majority"]
    assert 0 <= run["patient_accuracy"] <= 1 and run["n_patients"] == 15
    mags = pd.read_csv(out / "logreg" / "magnification.csv", dtype={"magnification": str})
    assert mags["magnification"].tolist() == ["40", "100", "all"] and mags["n_images"].tolist() == [16, 16, 32]
    assert "Patient-level accuracy" in (out / "report.html").read_text()

    # BreakHis's own 82-style slide ids instead, from the same store.
    by_slide = tmp_path / "by-slide"
    cv_cli.main(["--features", str(features), "--out", str(by_slide), "--breakhis-patients", "slide", *FAST])
    folds = pd.read_csv(by_slide / "folds.csv", dtype=str)
    assert folds["group"].nunique() == 16 and "14-22549AB" in set(folds["group"])
    assert folds.groupby("group")["fold"].nunique().max() == 1

    # One magnification only; an unknown one is refused before any work.
    at40 = tmp_path / "report40"
    cv_cli.main(["--features", str(features), "--out", str(at40), "--magnification", "40", *FAST])
    assert json.loads((at40 / "metrics.json").read_text())["n_images"] == 16
    with pytest.raises(SystemExit) as info:
        cv_cli.main(["--features", str(features), "--out", str(tmp_path / "r400"), "--magnification", "400", *FAST])
    assert info.value.code == 2
    assert "magnification 400 is not in the data set (magnifications found: 40, 100)" in capsys.readouterr().err
    assert not (tmp_path / "r400").exists()

    model = tmp_path / "model"
    assert train_cli.main(["--features", str(features), "--out", str(model), "--labels", "breakhis8",
                           "--classifier", "logreg", "--n-jobs", "1"]) == 0
    assert "predict also reports: breakhis2 (benign, malignant)" in capsys.readouterr().out
    csv = tmp_path / "pred.csv"
    assert predict_cli.main(["--model", str(model), "--data", str(tree), "--magnification", "100",
                             "--out", str(csv), "--quiet"]) == 0
    table = pd.read_csv(csv, dtype=str)
    assert len(table) == 16 and set(table["magnification"]) == {"100"}
    assert {"truth", "group", "prediction", "prediction_breakhis2"} <= set(table.columns)
    accuracy = pd.read_csv(tmp_path / "pred-accuracy.csv", dtype={"magnification": str})
    row = accuracy[(accuracy["level"] == "breakhis2") & (accuracy["magnification"] == "all")].iloc[0]
    benign = {"adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"}
    truth2 = table["truth"].map(lambda t: "benign" if t in benign else "malignant")
    assert row["accuracy"] == pytest.approx(float((truth2 == table["prediction_breakhis2"]).mean()))


def test_bach_model_predicts_breakhis_through_a_mapping(breakhis, tiny_dir, tmp_path, capsys):
    tree, _ = breakhis
    assert extract_cli.main(["--data", str(tiny_dir), "--out", str(tmp_path / "bach"), *TINY]) == 0
    model = tmp_path / "bach-model"
    assert train_cli.main(["--features", str(tmp_path / "bach"), "--out", str(model), "--classifier", "logreg",
                           "--n-jobs", "1"]) == 0
    mapping = tmp_path / "bach-to-breakhis.json"
    mapping.write_text(json.dumps({"benign": ["non-carcinoma"], "malignant": ["carcinoma"]}))
    csv = tmp_path / "cross.csv"
    assert predict_cli.main(["--model", str(model), "--data", str(tree), "--magnification", "40", "--map",
                             str(mapping), "--out", str(csv), "--quiet"]) == 0
    table = pd.read_csv(csv, dtype=str)
    carcinoma = table["prediction"].isin(["insitu", "invasive"])
    assert (table["prediction_bach-to-breakhis"] == carcinoma.map({True: "malignant", False: "benign"})).all()
    accuracy = pd.read_csv(tmp_path / "cross-accuracy.csv", dtype={"magnification": str})
    assert accuracy["level"].unique().tolist() == ["bach-to-breakhis"]
    assert "accuracy (image level" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": ["grade1"], "y": ["grade2"]}))
    assert predict_cli.main(["--model", str(model), "--data", str(tree), "--map", str(bad),
                             "--out", str(tmp_path / "no.csv")]) == 2
    assert "maps neither the model's classes nor those of its groupings" in capsys.readouterr().err


def _grade_folders(root, tissues, per_class, seed):
    """Folders grade1, grade2, ... of small synthetic images drawn as the given tissues."""
    import numpy as np

    from data.io import write_image
    from data.synthetic import make_image

    for k, tissue in enumerate(tissues):
        for i in range(per_class):
            write_image(root / f"grade{k + 1}" / f"{i}.png",
                        make_image(tissue, np.random.default_rng([seed, k, i]), (64, 96)))
    return root


def test_own_classes_and_mapping_file_end_to_end(tmp_path, capsys):
    import numpy as np

    data = _grade_folders(tmp_path / "grades", ("benign", "insitu", "invasive"), per_class=3, seed=3)
    mapping = tmp_path / "low-high.json"
    mapping.write_text(json.dumps({"low": ["grade1"], "high": ["grade2", "grade3"]}))
    assert extract_cli.main(["--data", str(data), "--out", str(tmp_path / "features"), *TINY]) == 0
    assert "classes: grade1 3, grade2 3, grade3 3" in capsys.readouterr().out
    cv_cli.main(["--features", str(tmp_path / "features"), "--out", str(tmp_path / "report"), "--regroup",
                 str(mapping), *FAST])
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["classes"] == ["grade1", "grade2", "grade3"]
    assert list(metrics["runs"]["logreg"]["majority"]["levels"]) == ["low-high"]
    cv_cli.main(["--features", str(tmp_path / "features"), "--out", str(tmp_path / "coarse"), "--labels",
                 str(mapping), *FAST])
    assert json.loads((tmp_path / "coarse" / "metrics.json").read_text())["classes"] == ["low", "high"]
    model = tmp_path / "model"
    assert train_cli.main(["--features", str(tmp_path / "features"), "--out", str(model), "--labels", "classes",
                           "--regroup", str(mapping), "--classifier", "logreg", "--n-jobs", "1"]) == 0
    csv = tmp_path / "p.csv"
    assert predict_cli.main(["--model", str(model), str(data / "grade1"), "--out", str(csv), "--quiet"]) == 0
    assert pd.read_csv(csv)["prediction_low-high"].isin(["low", "high"]).all()
    from pipeline import heatmap as heatmap_cli

    assert heatmap_cli.main(["--model", str(model), str(data / "grade3" / "0.png"), "--window", "32", "--step", "32",
                             "--out", str(tmp_path / "maps")]) == 0
    maps = [np.load(tmp_path / "maps" / f"0.{c}.npy") for c in ("grade1", "grade2", "grade3")]
    np.testing.assert_allclose(sum(maps), 1.0, atol=1e-5)
    # A mapping that leaves a class unmapped is refused before any work, naming the file.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"low": ["grade1"], "high": ["grade3"]}))
    with pytest.raises(SystemExit) as info:
        cv_cli.main(["--features", str(tmp_path / "features"), "--out", str(tmp_path / "bad"), "--labels",
                     str(bad), *FAST])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.json' leaves label(s) of the store(s) unmapped: 'grade2' (3 images)" in err


def test_two_stage_trains_and_predicts_any_classes(tmp_path, capsys):
    from pipeline import two_stage as two_stage_cli

    data = _grade_folders(tmp_path / "grades", ("normal", "insitu", "invasive"), per_class=2, seed=5)
    model = tmp_path / "model"
    assert two_stage_cli.main(["train", "--data", str(data), "--out", str(model), "--patch-size", "64",
                               "--stride", "32", "--width", "2", "--image-width", "4", "--epochs", "1",
                               "--image-epochs", "1", "--batch-size", "16", "--patch-copies", "1",
                               "--image-copies", "1", "--val-fraction", "0", "--quiet"]) == 0
    record = json.loads((model / "config.json").read_text())
    assert record["classes"] == ["grade1", "grade2", "grade3"]
    csv = tmp_path / "p.csv"
    assert predict_cli.main(["--model", str(model), str(data / "grade2"), "--out", str(csv), "--quiet"]) == 0
    table = pd.read_csv(csv)
    assert len(table) == 2 and table["prediction"].isin(["grade1", "grade2", "grade3"]).all()
    assert {"proba_grade1", "proba_grade2", "proba_grade3"} <= set(table.columns)
