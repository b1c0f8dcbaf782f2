"""Issue 13: outputs checked before work, reports and models swapped in whole (items 13, 16, 17)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest

from features.config import ExtractionConfig
from features.store import FeatureStore, make_record

CLASSES = ("normal", "benign", "insitu", "invasive")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of 24 images with separable random features (6 per class)."""
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path_factory.mktemp("stores"), ExtractionConfig(weights="none")).open()
    for ci, cls in enumerate(CLASSES):
        for i in range(6):
            centre = rng.normal(size=4)
            centre[ci] += 3
            store.write(make_record(image_id=f"{cls}/{i}.png", label=cls, group=f"{cls}{i}",
                                    path=f"/d/{cls}/{i}.png", source_sha256="0" * 64,
                                    features=centre + rng.normal(scale=0.2, size=(2, 4)), stain_note=None))
    store.close()
    return store.path


def _cv(store, out, *extra):
    from pipeline.cv_report import main

    return main(["--features", str(store), "--out", str(out), "--classifier", "logreg", "--folds", "3", *extra])


def _exit_code(call):
    with pytest.raises(SystemExit) as info:
        call()
    return info.value.code


# -- item 13: bad output paths are refused before any work -----------------------------------


def test_cv_report_out_a_file_is_refused_before_the_cv(store, tmp_path, capsys, monkeypatch):
    import pipeline.cv_report as cv

    monkeypatch.setattr(cv, "run_cross_validation", lambda *a, **k: pytest.fail("the CV ran"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert _exit_code(lambda: _cv(store, a_file)) == 2
    assert "is a file" in capsys.readouterr().err


def test_extract_out_a_file_is_refused(tiny_dir, tmp_path, capsys):
    from pipeline import extract

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert extract.main(["--data", str(tiny_dir), "--out", str(a_file), "--weights", "none"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_predict_out_a_directory_is_refused_before_predicting(tmp_path, capsys, monkeypatch):
    from classifiers import protocol
    from pipeline import predict

    monkeypatch.setattr(protocol, "load_model", lambda *a: pytest.fail("the model was loaded"))
    image = tmp_path / "x.png"
    image.write_bytes(b"x")
    assert predict.main(["--model", str(tmp_path), str(image), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_train_out_a_file_is_refused_before_training(store, tmp_path, capsys, monkeypatch):
    from classifiers import FeatureModel
    from pipeline import train

    monkeypatch.setattr(FeatureModel, "fit", lambda *a, **k: pytest.fail("the model was trained"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert train.main(["--features", str(store), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err


# -- item 16: a report is swapped in whole; a used directory needs --overwrite ----------------


def test_cv_report_refuses_a_used_directory_and_overwrite_leaves_no_stale_file(store, tmp_path, capsys):
    out = tmp_path / "report"
    _cv(store, out)
    (out / "tuning.csv").write_text("stale")
    (out / "xgboost").mkdir()
    assert _exit_code(lambda: _cv(store, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    _cv(store, out, "--overwrite")
    assert not (out / "tuning.csv").exists() and not (out / "xgboost").exists()
    assert json.loads((out / "metrics.json").read_text())["runs"]["logreg"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert _exit_code(lambda: _cv(store, other, "--overwrite")) == 2
    assert "is not a report" in capsys.readouterr().err and (other / "keep.txt").exists()


def test_full_disk_while_writing_leaves_the_previous_report_whole(store, tmp_path, monkeypatch):

    out = tmp_path / "report"
    _cv(store, out)
    before = (out / "metrics.json").read_bytes()
    real = pd.DataFrame.to_csv

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)  # metrics.json is written, the tables fail
    with pytest.raises(OSError, match="No space left"):
        _cv(store, out, "--overwrite", "--seed", "3")
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    assert (out / "metrics.json").read_bytes() == before and (out / "predictions.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary directory left


# -- item 17: train --overwrite swaps, then deletes -------------------------------------------


def test_train_overwrite_never_leaves_no_model(store, tmp_path, monkeypatch):
    import shutil

    from classifiers.feature.model_io import load_model
    from pipeline import train

    out = tmp_path / "model"
    args = ["--features", str(store), "--out", str(out), "--classifier", "logreg"]
    assert train.main(args) == 0
    seen = []
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *a, **k):
        # the moment the old model is deleted, the new one must already be in place
        seen.append(load_model(out).scheme)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        train.main([*args, "--overwrite", "--labels", "binary"])
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert seen and set(seen) == {"binary"} and load_model(out).scheme == "binary"
