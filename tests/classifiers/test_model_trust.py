"""Issue 13: model directories safe to load from others (items 2, 4)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from features.config import ExtractionConfig
from conftest import extracted_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def xgb_dir(tmp_path_factory):
    from classifiers.evaluation.cv_dataset import build_dataset
    from classifiers.feature.model_io import TrainConfig, save_model, train_model

    config = TrainConfig(classifier="xgboost", n_jobs=1, device="cpu")
    model = train_model(build_dataset([extracted_table()], "bach4"), config)
    return save_model(model, tmp_path_factory.mktemp("m") / "xgb")


def _tampered(xgb_dir, tmp_path, edit):
    """A copy of the model whose booster is edited, with its sha256 recomputed in model.json."""
    import shutil

    out = tmp_path / "tampered"
    shutil.copytree(xgb_dir, out)
    booster = json.loads((out / "estimator-0.json").read_text())
    edit(booster["learner"]["gradient_booster"]["model"]["trees"][0])
    raw = json.dumps(booster).encode()
    (out / "estimator-0.json").write_bytes(raw)
    record = json.loads((out / "model.json").read_text())
    record["estimators"][0]["sha256"] = hashlib.sha256(raw).hexdigest()
    (out / "model.json").write_text(json.dumps(record))
    return out


def _load_and_predict(model_dir):
    # In a child process: a booster that crashes XGBoost must fail this test, not kill pytest.
    script = textwrap.dedent(f"""
        import numpy as np
        from classifiers.feature.model_io import ModelFormatError, load_model
        try:
            model = load_model({str(model_dir)!r})
        except ModelFormatError as exc:
            print("refused:", exc)
        else:
            print("loaded", model.fitted.predict_proba([np.zeros((3, 4), np.float32)]).shape)
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["split_indices"].__setitem__(0, 10**6), "splits on feature 1000000"),
    (lambda t: t["left_children"].__setitem__(0, 10**6), "outside 0.."),
    (lambda t: t["left_children"].__setitem__(0, 0), "reached twice"),
])
def test_crafted_booster_is_refused_before_xgboost_reads_it(xgb_dir, tmp_path, edit, message):
    done = _load_and_predict(_tampered(xgb_dir, tmp_path, edit))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and message in done.stdout and "estimator-0.json" in done.stdout


def test_honest_booster_still_loads(xgb_dir):
    done = _load_and_predict(xgb_dir)
    assert done.returncode == 0 and "loaded (3, 4)" in done.stdout, done.stderr[-2000:]


def test_model_json_cannot_make_predict_read_a_local_file(xgb_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from features import backbones
    from pipeline import predict as predict_cli

    model_dir = tmp_path / "model"
    shutil.copytree(xgb_dir, model_dir)
    record = json.loads((model_dir / "model.json").read_text())
    secret = tmp_path / "secret.txt"
    secret.write_text("not for others\n")
    store = record["stores"][0]["config"]
    store.update(weights=str(secret), weights_file=str(secret), weights_sha256="0" * 64)
    store["config_hash"] = ExtractionConfig.from_dict(store).config_hash  # a consistent crafted model
    (model_dir / "model.json").write_text(json.dumps(record))
    opened = []
    real = backbones.file_sha256
    monkeypatch.setattr(backbones, "file_sha256", lambda path, *a: (opened.append(str(path)), real(path, *a))[1])
    image = tmp_path / "x.png"
    image.write_bytes(b"never read")
    assert predict_cli.main(["--model", str(model_dir), str(image), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in err and str(secret) not in opened
    assert "--weights efficientnet_lite0=FILE" in err
