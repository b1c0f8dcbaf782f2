"""Issue 12 end to end through the Python API: a synthetic BreakHis tree, three arbitrary
classes, a mapping file, and one image present twice, from images to predictions."""
from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before xgboost loads (see pipeline/cv_report.py)

import numpy as np
import pandas as pd
import pytest

from classifiers import CVConfig, build_dataset, run_cross_validation
from classifiers.evaluation.patients import patient_accuracy
from classifiers.evaluation.report import write_report
from classifiers.feature.model_io import TrainConfig, load_model, save_model, train_model
from classifiers.feature.predict import predict_dataset
from data.datasets import load_dataset
from data.mapping import load_mapping
from data.synthetic import make_image, write_breakhis
from data.io import write_image
from features.extract import extract_to_store, make_config
from features.store import load_store
from conftest import TINY_PROTOCOL

FAST = dict(n_jobs=1, classifiers=("logreg",))


def _extract(dataset, root):
    config = make_config(dataset, backbone="efficientnet_lite0", weights=None, **TINY_PROTOCOL)
    summary = extract_to_store(dataset, config, root, progress=False)
    assert not summary.skipped
    return summary.store_path


@pytest.fixture(scope="module")
def breakhis(tmp_path_factory):
    """The synthetic BreakHis tree (8 subtypes x 2 patients x 40x/100x), its store."""
    root = tmp_path_factory.mktemp("bh")
    tree = write_breakhis(root, patients_per_subtype=2, magnifications=("40", "100"), size=(64, 96))
    dataset = load_dataset(tree)
    return tree, dataset, _extract(dataset, root / "features")


def test_breakhis_from_images_to_report_model_and_predictions(breakhis, tmp_path):
    tree, dataset, store = breakhis
    table = load_store(store)
    assert set(table.meta["magnification"]) == {"40", "100"}
    cv_data = build_dataset([table])  # auto: benign / malignant
    assert (cv_data.scheme, cv_data.classes) == ("breakhis2", ("benign", "malignant"))
    result = run_cross_validation(cv_data, CVConfig(n_folds=3, **FAST))
    # Patient-grouped folds: strict grouping joins 14-22549AB (adenosis) and 14-22549CD (fibroadenoma).
    folds = result.folds
    assert folds.groupby("group")["fold"].nunique().max() == 1
    assert folds["group"].nunique() == 15
    assert folds.loc[folds["group"] == "14-22549"].shape[0] == 4
    written = write_report(result, tmp_path / "report")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    run = metrics["runs"]["logreg"]["majority"]
    predictions = result.runs[0].predictions
    assert run["patient_accuracy"] == pytest.approx(
        patient_accuracy(predictions["truth"], predictions["prediction"], predictions["group"]))
    mags = pd.read_csv(tmp_path / "report" / "logreg" / "magnification.csv", dtype={"magnification": str})
    assert mags["magnification"].tolist() == ["40", "100", "all"]
    assert mags["n_images"].tolist() == [16, 16, 32]
    at40 = predictions[predictions["magnification"] == "40"]
    assert mags.loc[0, "image_accuracy"] == pytest.approx(float((at40["truth"] == at40["prediction"]).mean()))
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Patient-level accuracy" in html and "Per magnification" in html
    assert any(f.endswith("magnification.csv") for f in written["files"])

    # 8-class model, which also reports benign / malignant; predicting labelled images gives accuracy.
    fine = build_dataset([table], "breakhis8")
    model = train_model(fine, TrainConfig(scheme="breakhis8", classifier="logreg", n_jobs=1))
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    assert record["label_scheme"]["name"] == "breakhis8"
    assert [g["name"] for g in record["groupings"]] == ["breakhis2"]
    # A model directory written before the scheme was recorded reads its built-in scheme's groupings.
    old = tmp_path / "old-model"
    shutil.copytree(tmp_path / "model", old)
    (old / "model.json").write_text(json.dumps({k: v for k, v in record.items()
                                                if k not in ("label_scheme", "groupings")}))
    scheme, groupings = load_model(old).scheme_objects()
    assert (scheme.name, [g.name for g in groupings]) == ("breakhis8", ["breakhis2"])
    held_out = dataset[dataset["magnification"] == "40"].head(6)
    out, accuracy = predict_dataset(loaded, held_out)
    assert out.table.columns[:6].tolist() == ["image", "image_id", "truth", "group", "magnification", "prediction"]
    assert "prediction_breakhis2" in out.table.columns
    by_level = accuracy.set_index(["level", "magnification"])
    truth2 = np.where(out.table["truth"].isin(["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"]),
                      "benign", "malignant")
    assert by_level.loc[("breakhis2", "all"), "accuracy"] == pytest.approx(
        float(np.mean(truth2 == out.table["prediction_breakhis2"])))
    assert by_level.loc[("breakhis8", "40"), "accuracy"] == pytest.approx(
        float(np.mean(out.table["truth"] == out.table["prediction"])))


def test_three_arbitrary_classes_with_a_mapping_file_and_a_copy(tmp_path):
    data = tmp_path / "grades"
    draw = {"grade1": "benign", "grade2": "insitu", "grade3": "invasive"}
    for k, (grade, tissue) in enumerate(draw.items()):
        for i in range(4):
            write_image(data / grade / f"{grade}_{i}.png", make_image(tissue, np.random.default_rng([7, k, i]), (64, 96)))
    shutil.copy(data / "grade2" / "grade2_0.png", data / "grade2" / "renamed_copy.png")
    dataset = load_dataset(data)
    assert dataset.attrs["duplicates"] == [["grade2/grade2_0.png", "grade2/renamed_copy.png"]]
    store = _extract(dataset, tmp_path / "features")
    table = load_store(store)
    cv_data = build_dataset([table])
    assert cv_data.classes == ("grade1", "grade2", "grade3")
    assert cv_data.duplicates == [["grade2/grade2_0.png", "grade2/renamed_copy.png"]]
    result = run_cross_validation(cv_data, CVConfig(n_folds=3, **FAST))
    fold = result.folds.set_index("image_id")["fold"]
    assert fold["grade2/grade2_0.png"] == fold["grade2/renamed_copy.png"]  # both copies in one fold
    write_report(result, tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "grade2/grade2_0.png = grade2/renamed_copy.png" in html

    mapping = tmp_path / "low-high.json"
    mapping.write_text(json.dumps({"low": ["grade1"], "high": ["grade2", "grade3"]}))
    coarse = build_dataset([table], str(mapping))
    assert coarse.classes == ("low", "high")
    result = run_cross_validation(coarse, CVConfig(scheme=str(mapping), n_folds=3, **FAST))
    summary = write_report(result, tmp_path / "coarse")["summary"]
    assert summary["label_scheme"]["source"] == str(mapping)
    assert summary["runs"]["logreg"]["majority"]["binary_table"][0]["comparison"] == "low vs high"
    model = train_model(build_dataset([table], "classes", regroup=[str(mapping)]),
                        TrainConfig(scheme="classes", classifier="logreg", n_jobs=1))
    save_model(model, tmp_path / "model")
    out, accuracy = predict_dataset(load_model(tmp_path / "model"), dataset.head(3), mapping=None)
    assert accuracy["level"].tolist() == ["classes", "low-high"]
    assert out.table["prediction_low-high"].isin(["low", "high"]).all()
    assert load_mapping(mapping).classes == ("low", "high")
