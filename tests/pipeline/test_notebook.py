"""Execute notebooks/walkthrough.ipynb in a temporary folder and check what it shows."""
import base64
import json
import os
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def _text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def _pngs(cell) -> list:
    return [base64.b64decode(o.data["image/png"]) for o in cell.get("outputs", [])
            if "data" in o and "image/png" in o.data]


def _cell(cells, start: str):
    (found,) = [c for c in cells if c.cell_type == "code" and c.source.startswith(start)]
    return found


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {
        # The kernel imports the project from this tree, whatever folder it runs in.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(work)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, work / "walkthrough-run"


def test_walkthrough_extracts_and_reports(executed):
    nb, run = executed
    cells = nb.cells
    assert "normal      6" in _text(_cell(cells, "from pathlib import Path"))
    assert "main(" not in "".join(c.source for c in cells if c.cell_type == "code")  # the API, not the CLIs
    extracted = _text(_cell(cells, "features = extract_features("))
    assert "images extracted now: 24, already in the store: 0, skipped: 0" in extracted
    assert "96 crops in" in extracted  # 24 images x 2 augmentations x 2 crops
    (store,) = (run / "features").glob("efficientnet_lite0-*")
    config = json.loads((store / "config.json").read_text())
    assert config["weights"] == "imagenet" and config["weights_sha256"]
    assert (config["augmentations"], config["crops"], config["crop_size"], config["scale"]) == (2, 2, 128, 0.5)

    report = _text(_cell(cells, "result = cross_validate("))
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    accuracy = metrics["runs"]["logreg"]["majority"]["accuracy"]
    assert "24 images, 6 grouped folds" in report
    shown = re.search(r"cross-validated accuracy \(majority vote\): ([0-9.]+)", report).group(1)
    assert shown == f"{accuracy:.3f}"
    confusion = pd.read_csv(run / "report" / "logreg" / "confusion.csv", index_col=0)
    assert confusion.to_numpy().sum() == 24 and (confusion.sum(axis=1) == 6).all()
    assert np.trace(confusion.to_numpy()) / 24 == pytest.approx(accuracy)

    pictures = _pngs(_cell(cells, "display(Image(filename=run"))
    assert pictures == [(run / "report" / "logreg" / name).read_bytes() for name in ("confusion.png", "roc.png")]


def test_walkthrough_trains_and_predicts(executed):
    nb, run = executed
    cells = nb.cells
    trained = _text(_cell(cells, "model = train("))
    assert "trained on 24 images (normal 6, benign 6, insitu 6, invasive 6), 48 augmentation rows" in trained
    assert "['estimator-0.npz', 'model.json']" in trained
    assert len(_pngs(_cell(cells, "new = write_dataset"))) == 2

    shown = _text(_cell(cells, "predictions = predict_images("))
    table = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    images = ["walkthrough-run/new/insitu/insitu_0.png", "walkthrough-run/new/invasive/invasive_0.png"]
    assert list(table["image"]) == images and (table["n_aug"] == 2).all()
    probas = table[[f"proba_{c}" for c in ("normal", "benign", "insitu", "invasive")]].to_numpy()
    votes = table[[f"votes_{c}" for c in ("normal", "benign", "insitu", "invasive")]].to_numpy()
    np.testing.assert_allclose(probas.sum(axis=1), 1.0)
    assert (votes.sum(axis=1) == 2).all()
    # The invasive image is unambiguous (mean probability ~0.99 when this test was written).
    assert table["prediction"][1] == "invasive" and probas[1, 3] > 0.8
    for image, prediction in zip(images, table["prediction"]):
        assert f"{image}: {prediction} (votes: " in shown
    assert "2 images predicted" in shown


def test_walkthrough_draws_a_heatmap(executed):
    nb, run = executed
    shown = _text(_cell(nb.cells, "hm = heatmap("))
    # invasive_0 scaled by 0.5 is 128 x 160: 64-pixel windows every 32 pixels make a 3 x 4 grid.
    assert "3x4 windows; whole image: " in shown and "mean of the window probabilities" in shown
    sidecar = json.loads((run / "heatmaps" / "invasive_0.heatmap.json").read_text())
    assert sidecar["image"].endswith("invasive_0.png")
    maps = [np.load(run / "heatmaps" / f"invasive_0.{c}.npy") for c in ("normal", "benign", "insitu", "invasive")]
    assert all(m.shape == (3, 4) for m in maps)
    np.testing.assert_allclose(sum(maps), 1.0, atol=1e-5)
    assert _pngs(_cell(nb.cells, "hm = heatmap(")) == [(run / "heatmaps" / "invasive_0.heatmap.png").read_bytes()]


def test_walkthrough_reads_a_breakhis_shaped_set_by_patient_and_magnification(executed):
    nb, run = executed
    listed = _text(_cell(nb.cells, "from data import load_dataset, write_breakhis"))
    assert "32 images, 15 patients, magnifications ['200', '400']" in listed
    shown = _text(_cell(nb.cells, "bh_features = extract_features("))
    metrics = json.loads((run / "breakhis-report" / "metrics.json").read_text())
    run_ = metrics["runs"]["logreg"]["majority"]
    assert metrics["classes"] == ["benign", "malignant"]
    assert (f"image-level accuracy {run_['accuracy']:.3f}, patient-level accuracy "
            f"{run_['patient_accuracy']:.3f} over 15 patients") in shown
    folds = pd.read_csv(run / "breakhis-report" / "folds.csv", dtype=str)
    assert folds.groupby("group")["fold"].nunique().max() == 1
    assert [m["magnification"] for m in run_["magnification"]] == ["200", "400", "all"]
