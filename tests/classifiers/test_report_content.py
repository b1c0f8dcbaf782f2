"""The report a paper can cite (issue 14): Methods from the stores' real config, 95 % confidence
intervals, the gallery of misclassified images, the grouping ROC and calibration curves,
readable tables and class names."""

import html
import json
import re
from importlib.metadata import version

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from classifiers.evaluation.cross_validation import CVConfig, run_cross_validation
from classifiers.evaluation.cv_dataset import build_dataset
from classifiers.evaluation.metrics import bootstrap_ci, reliability, weighted_auc
from classifiers.evaluation.report import confusion_figure, write_report
from data.labels import class_names
from features.config import ExtractionConfig
from features.store import FeatureTable

BACH4 = class_names("bach4")
WEIGHTS_SHA = "5" * 8 + "a" * 56
STAIN_SHA = "c" * 64


def _table(image_dir, n_per_class=10, n_aug=4, signal=1.0, seed=3):
    """Weakly separable features of real (tiny) image files, so there are errors to show."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for ci, cls in enumerate(BACH4):
        for i in range(n_per_class):
            image_id = f"{cls}/{cls}-{i:02d}.png"
            path = image_dir / image_id
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8))
            centre = rng.normal(scale=0.7, size=6)
            centre[ci] += signal
            note = "no tissue: 0.2% of pixels are stained" if (ci, i) == (0, 0) else None
            for aug in range(n_aug):
                rows.append((image_id, cls, f"patient-{ci}-{i // 2}", aug, str(path), note))
                X.append(centre + rng.normal(scale=0.3, size=6))
    meta = pd.DataFrame(rows, columns=["image_id", "label", "group", "aug", "path", "stain_note"])
    config = ExtractionConfig(backbone="efficientnet_lite0", weights="imagenet", weights_sha256=WEIGHTS_SHA,
                              augmentations=n_aug, crops=5, crop_size=224, scale=0.25, pooling="mean",
                              mode="shared", stain={"method": "macenko", "reference": "normal/n007.tif",
                                                    "reference_sha256": STAIN_SHA})
    record = {**config.to_dict(), "config_hash": config.config_hash}
    return FeatureTable(meta=meta, X=np.asarray(X, dtype=np.float32), config=record)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("content")
    table = _table(root / "images")
    result = run_cross_validation(build_dataset([table], "bach4"), CVConfig(n_folds=4, seed=2, n_jobs=1))
    out = root / "report"
    written = write_report(result, out, command="python -m pipeline.cv_report --features S --out R")
    page = (out / "report.html").read_text(encoding="utf-8")
    return out, result, written["summary"], page, table


def test_methods_section_states_the_stores_real_config_and_versions(report):
    out, result, summary, page, table = report
    methods = page[page.index("<h2>Methods</h2>"):page.index("<h3>Stores</h3>")]
    config = table.config
    for value in (WEIGHTS_SHA, STAIN_SHA, "normal/n007.tif", config["config_hash"], "efficientnet_lite0",
                  "shared", "python -m pipeline.cv_report --features S --out R"):
        assert value in methods, value
    for setting, value in (("colour augmentations per image", 4), ("crops per augmentation", 5),
                           ("scale", 0.25), ("pooling", "mean"), ("seed", 0)):
        assert re.search(rf"<td>{re.escape(setting)}</td>\s*<td>{value}</td>", methods), setting
    # The image Macenko could not normalise, and why.
    assert "normal/normal-00.png (no tissue: 0.2% of pixels are stained)" in methods
    for package in ("numpy", "scikit-learn", "xgboost", "keras"):
        assert f"<td>{package}</td>\n      <td>{version(package)}</td>" in methods, package
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["environment"]["numpy"] == version("numpy")
    assert metrics["environment"]["xgboost"] == version("xgboost")
    data = metrics["methods"]["data"]
    assert data["images_per_class"] == {c: 10 for c in BACH4}
    assert data["groups_per_class"] == {c: 5 for c in BACH4} and data["groups_are_patients"]
    xgb = next(c for c in metrics["methods"]["classifiers"] if c["name"] == "xgboost")
    assert xgb["params"]["n_estimators"] == 250 and xgb["params"]["max_depth"] == 3
    paragraph = (out / "methods.txt").read_text()
    assert paragraph.startswith("We classified 40 H&E images from 20 patients (10 normal, 10 benign, 10 in situ, "
                                "10 invasive)")
    assert "4-fold stratified cross-validation grouped by patient" in paragraph and "fold seed 2" in paragraph
    assert f"sha256 {WEIGHTS_SHA[:12]}" in paragraph and f"numpy {version('numpy')}" in paragraph
    assert "1 image(s) were left unnormalised" in paragraph
    # 40x60 images at scale 0.25 are 10x15: the 224-px crops are really 10 px, and the Methods say so.
    assert "5 random square crops of 10 px (224 px capped at the shorter side of the resized image)" in paragraph
    assert re.search(r"<td>crop sides the images got \(px\)</td>\s*<td>10</td>", methods)
    assert paragraph.strip() in html.unescape(page)


def test_confidence_intervals_contain_the_point_estimates(report):
    out, result, summary, page, _ = report
    for name, run in summary["runs"].items():
        ci = run["ci95"]
        points = {"accuracy_majority": run["majority"]["accuracy"], "accuracy_mean_proba": run["mean_proba"]["accuracy"],
                  "macro_auc": run["roc_auc"]["macro"],
                  "auc carcinoma vs non-carcinoma": run["roc_auc"]["groupings"]["carcinoma vs non-carcinoma"]}
        for key, point in points.items():
            low, high = ci[key]
            assert low <= point <= high, (name, key, low, point, high)
            assert high - low > 0.02, (name, key)  # 40 images with errors: a real interval
        assert 0.3 < run["majority"]["accuracy"] < 0.95  # the fixture has errors to show
        assert f"{ci['accuracy_majority'][0]:.3f}, {ci['accuracy_majority'][1]:.3f}]" in page
    summary_csv = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary_csv.loc["logreg", "accuracy_ci_low"] == pytest.approx(summary["runs"]["logreg"]["ci95"]["accuracy_majority"][0])


def test_bootstrap_is_seeded_and_resamples_patients():
    rng = np.random.default_rng(0)
    n = 60
    proba = rng.dirichlet(np.ones(3), size=n)
    truth = np.array(["benign", "insitu", "invasive"])[rng.integers(0, 3, n)]
    frame = pd.DataFrame({"truth": truth, "prediction": truth, "prediction_mean_proba": truth,
                          "group": [f"p{i // 3}" for i in range(n)],
                          **{f"proba_{c}": proba[:, j] for j, c in enumerate(["benign", "insitu", "invasive"])}})
    frame.loc[:9, "prediction"] = "benign"
    a = bootstrap_ci(frame, ["benign", "insitu", "invasive"])
    assert a == bootstrap_ci(frame, ["benign", "insitu", "invasive"])  # fixed seed
    assert a != bootstrap_ci(frame, ["benign", "insitu", "invasive"], seed=1)
    # Whole patients are drawn: with three identical images per patient the interval is that of
    # 20 draws, wider than if the 60 images were drawn independently.
    independent = bootstrap_ci(frame.assign(group=[f"i{i}" for i in range(n)]), ["benign", "insitu", "invasive"])
    width = lambda ci: ci["accuracy_majority"][1] - ci["accuracy_majority"][0]  # noqa: E731
    assert width(a) >= width(independent) - 1e-9


def test_weighted_auc_matches_scikit_learn():
    rng = np.random.default_rng(5)
    y = rng.random(150) < 0.4
    score = np.round(rng.random(150), 1)  # many ties
    weights = rng.integers(0, 4, size=(6, 150)).astype(float)
    expected = [roc_auc_score(y, score, sample_weight=w) for w in weights]
    np.testing.assert_allclose(weighted_auc(y, score, weights), expected, rtol=1e-12)
    assert np.isnan(weighted_auc(y, score, np.where(y, 0.0, 1.0)[None, :]))[0]


def test_gallery_shows_every_misclassified_image_most_confident_first(report):
    out, result, summary, page, _ = report
    n_thumbnails = 0
    for run in result.runs:
        pred = run.predictions
        wrong = pred[pred["truth"] != pred["prediction"]]
        errors = pd.read_csv(out / run.spec.name / "errors.csv")
        assert sorted(errors["image_id"]) == sorted(wrong["image_id"]) and len(errors) > 3
        assert errors["proba_prediction"].is_monotonic_decreasing
        first = wrong.set_index("image_id").loc[errors.loc[0, "image_id"]]
        assert errors.loc[0, "votes"] == first[f"votes_{first['prediction']}"]
        assert errors.loc[0, "proba_prediction"] == pytest.approx(first[f"proba_{first['prediction']}"])
        section = page[page.index(f"<h2>Run {run.spec.name}</h2>"):]
        section = section[:section.index("</div>", section.index("<div class='gallery'>"))]
        shown = re.findall(r"data-image-id='([^']+)'", section)
        assert shown == errors["image_id"].tolist()
        n_thumbnails += len(shown)
    # Thumbnails embedded (the image files exist), so report.html stays self-contained.
    assert page.count("data:image/jpeg;base64,") == n_thumbnails
    assert "votes" in page and "truth <b>" in page


def test_gallery_says_when_an_image_is_gone(tmp_path):
    table = _table(tmp_path / "images", n_per_class=6)
    for path in (tmp_path / "images").rglob("*.png"):
        path.unlink()
    result = run_cross_validation(build_dataset([table], "bach4"), CVConfig(classifiers=("logreg",), n_folds=3))
    write_report(result, tmp_path / "r")
    page = (tmp_path / "r" / "report.html").read_text()
    n_errors = len(pd.read_csv(tmp_path / "r" / "logreg" / "errors.csv"))
    assert n_errors > 0 and page.count("image not readable") == n_errors


def test_grouping_roc_and_calibration_curves(report):
    out, result, summary, page, _ = report
    for run in result.runs:
        name = run.spec.name
        for picture in ("roc.png", "roc_groupings.png", "calibration.png"):
            assert (out / name / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (name, picture)
        pred = run.predictions
        carcinoma = pred["truth"].isin(["insitu", "invasive"])
        auc = roc_auc_score(carcinoma, pred["proba_insitu"] + pred["proba_invasive"])
        groupings = summary["runs"][name]["roc_auc"]["groupings"]
        assert groupings["carcinoma vs non-carcinoma"] == pytest.approx(auc)
        pair = pred[pred["truth"].isin(["benign", "insitu"])]
        share = pair["proba_insitu"] / (pair["proba_benign"] + pair["proba_insitu"])
        assert groupings["benign vs insitu"] == pytest.approx(roc_auc_score(pair["truth"] == "insitu", share))
        calibration = summary["runs"][name]["calibration"]
        assert sum(b["n"] for b in calibration["bins"]) == 40
        confidence = pred[[f"proba_{c}" for c in BACH4]].max(axis=1)
        assert sum(b["n"] * b["confidence"] for b in calibration["bins"]) == pytest.approx(confidence.sum())
    # Four pictures per run, each embedded.
    assert page.count("data:image/png;base64,") == 4 * len(result.runs)
    assert "ROC of the groupings" in page and "expected calibration error" in page


def test_reliability_by_hand():
    frame = pd.DataFrame({"truth": ["a", "a", "b", "b"], "proba_a": [0.95, 0.55, 0.92, 0.3],
                          "proba_b": [0.05, 0.45, 0.08, 0.7]})
    rel = reliability(frame, ["a", "b"])
    # Bins (0.5, 0.6]: one right at 0.55; (0.6, 0.7]: one right at 0.7; (0.9, 1.0]: 0.95 right, 0.92 wrong.
    assert [(b["n"], b["accuracy"]) for b in rel["bins"]] == [(1, 1.0), (1, 1.0), (2, 0.5)]
    assert rel["ece"] == pytest.approx((0.45 + 0.3 + 2 * abs(0.5 - 0.935)) / 4)


def test_tables_have_one_header_row_and_readable_class_names(report):
    _, _, _, page, _ = report
    heads = re.findall(r"<thead>(.*?)</thead>", page, flags=re.S)
    assert heads and all(head.count("<tr") == 1 for head in heads)
    assert "<th>in situ</th>" in page and "truth \\ predicted" in page
    for heading in re.findall(r"<h[1-3]>(.*?)</h[1-3]>", page) + re.findall(r"<th>(.*?)</th>", page):
        assert "insitu" not in heading, heading
    classes_line = re.search(r"<p>Classes: (.*?)</p>", page).group(1)
    assert "in situ" in classes_line and "insitu" not in classes_line


def test_confusion_colour_bar_has_whole_number_ticks():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = confusion_figure(np.array([[3, 1], [0, 2]]), ["insitu", "invasive"], "t")
    FigureCanvasAgg(fig).draw()
    bar = fig.axes[1]
    ticks = [t for t in bar.get_yticks() if 0 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["in situ", "invasive"]
