"""The two-stage CNN in the cross-validated report, as a feature backend, and in predict.

Tiny synthetic images (128 x 160) and a shrunk two-stage CNN (32-pixel patches: 7 x 9 training
patches and a 4 x 5 image-wise grid per image, a few filters, 1 + 2 epochs), 3 folds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before xgboost loads (see pipeline/cv_report.py)

import numpy as np
import pandas as pd
import pytest

from classifiers.evaluation.folds import assign_folds
from classifiers.two_stage.model import TwoStageModel
from classifiers.two_stage.cv import RUNS, preset_config
from data.datasets import load_dataset
from data.synthetic import write_dataset
from features.store import load_store
from pipeline import cv_report
from pipeline import extract as extract_cli
from pipeline import predict as predict_cli
from pipeline import train as train_cli

TINY = dict(patch_size=32, stride=16, patch_width=2, image_width=4, dense_units=[8, 8, 4], epochs=1,
            image_epochs=2, batch_size=32, patch_copies=1, image_copies=2, val_fraction=0.25,
            inference_batch_size=64)
FOLDS = 3
TWO_STAGE_NAMES = [name for name, _, _ in RUNS]
COMMON = ["--folds", str(FOLDS), "--seed", "0", "--n-jobs", "1", "--device", "cpu",
          "--two-stage-config", json.dumps(TINY)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("syn"), n_per_class=6, size=(128, 160), seed=0)


@pytest.fixture(scope="module")
def store(data_dir, tmp_path_factory):
    """A random-init EfficientNet-Lite0 store of the same images (fast; the values do not matter)."""
    root = tmp_path_factory.mktemp("store")
    assert extract_cli.main(["--data", str(data_dir), "--out", str(root), "--weights", "none",
                             "--augmentations", "2", "--crops", "2", "--crop-size", "48", "--scale", "1",
                             "--stain-reference", "none", "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def report(data_dir, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    cv_report.main(["--features", str(store), "--data", str(data_dir), "--out", str(out), *COMMON])
    return out


@pytest.fixture(scope="module")
def fold_model(report):
    return report / "two_stage_folds" / "fold-0" / "model"


def test_report_has_every_run_on_the_same_folds(report, data_dir):
    predictions = pd.read_csv(report / "predictions.csv")
    assert list(dict.fromkeys(predictions["model"])) == ["xgboost", "logreg", *TWO_STAGE_NAMES]
    folds = predictions.pivot(index="image_id", columns="model", values="fold")
    assert len(folds) == 24 and not folds.isna().any().any()
    for name in TWO_STAGE_NAMES + ["logreg"]:
        pd.testing.assert_series_equal(folds[name], folds["xgboost"], check_names=False)
    # ... which are assign_folds over the data set's images (no manifest groups: one image each).
    data = load_dataset(data_dir)
    expected = assign_folds(data["label"].to_numpy(), data["image_id"].to_numpy(), FOLDS, 0)
    np.testing.assert_array_equal(folds.loc[data["image_id"], "xgboost"].to_numpy(), expected)
    saved = pd.read_csv(report / "folds.csv").set_index("image_id")
    np.testing.assert_array_equal(saved.loc[data["image_id"], "fold"].to_numpy(), expected)

    classes = ["normal", "benign", "insitu", "invasive"]
    for name in TWO_STAGE_NAMES:
        run = predictions[predictions["model"] == name]
        proba = run[[f"proba_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
        n_views = 8 if name == "two_stage_ensemble" else 1
        assert (run["n_aug"] == n_views).all()
        assert (run[[f"votes_{c}" for c in classes]].sum(axis=1) == n_views).all()
        assert (run["classifier"] == "two_stage").all()
        assert set(run["prediction"]) <= set(classes)
        if n_views == 1:
            assert (run["prediction"] == run["prediction_mean_proba"]).all()
    # The single pass and the ensemble are the fold model's own predictions of its test images.
    model = TwoStageModel.load(report / "two_stage_folds" / "fold-0" / "model")
    test = predictions[(predictions["model"] == "two_stage") & (predictions["fold"] == 0)]
    paths = [str(data_dir / i) for i in test["image_id"]]
    for name, ensemble in (("two_stage", False), ("two_stage_ensemble", True)):
        run = predictions[(predictions["model"] == name) & (predictions["fold"] == 0)]
        np.testing.assert_allclose(run[[f"proba_{c}" for c in classes]].to_numpy(),
                                   model.predict_proba(paths, ensemble=ensemble), atol=1e-5)
    summary = pd.read_csv(report / "summary.csv")
    assert list(summary["run"]) == ["xgboost", "logreg", *TWO_STAGE_NAMES]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["config"]["classifiers"] == ["xgboost", "logreg", "two_stage"]
    info = metrics["two_stage"]
    assert info["config"]["patch_size"] == 32 and len(info["folds"]) == FOLDS
    assert all(f["patch_epochs"] == 1 and f["train_seconds"] > 0 for f in info["folds"])
    for name in TWO_STAGE_NAMES:
        assert (report / name / "confusion.png").is_file() and (report / name / "roc.png").is_file()
    html = (report / "report.html").read_text()
    assert "Run two_stage_ensemble" in html and "Two-stage CNN" in html
    # Every fold's model is saved with its config; checkpoints are gone once it is.
    for k in range(FOLDS):  # numbered from 0, as in the report and the log
        fold = report / "two_stage_folds" / f"fold-{k}"
        assert sorted(p.name for p in fold.iterdir()) == ["fold.json", "model", "scores.npz"]
        record = json.loads((fold / "model" / "config.json").read_text())
        assert record["config"]["patch_size"] == 32 and record["config"]["scheme"] == "bach4"


def test_rerun_reuses_finished_folds_and_refuses_another_config(report, data_dir, store, tmp_path,
                                                               monkeypatch, capsys):
    copy = tmp_path / "r"
    shutil.copytree(report, copy)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was retrained")

    monkeypatch.setattr(TwoStageModel, "fit", no_training)
    # A finished report is replaced only with --overwrite; its finished folds are reused.
    cv_report.main(["--data", str(data_dir), "--out", str(copy), "--overwrite", *COMMON])  # two_stage only
    before = pd.read_csv(report / "predictions.csv")
    after = pd.read_csv(copy / "predictions.csv")
    assert list(dict.fromkeys(after["model"])) == TWO_STAGE_NAMES
    mine = before[before["classifier"] == "two_stage"].reset_index(drop=True)
    pd.testing.assert_frame_equal(after.drop(columns="stores"), mine.drop(columns="stores"))
    # A lost scores file is recomputed from the saved fold model, still without training.
    (copy / "two_stage_folds" / "fold-1" / "scores.npz").unlink()
    cv_report.main(["--data", str(data_dir), "--out", str(copy), "--overwrite", *COMMON])
    pd.testing.assert_frame_equal(pd.read_csv(copy / "predictions.csv"), after, atol=1e-6)

    capsys.readouterr()
    changed = COMMON[:-1] + [json.dumps({**TINY, "epochs": 2})]
    with pytest.raises(SystemExit) as exit_info:
        cv_report.main(["--data", str(data_dir), "--out", str(copy), "--overwrite", *changed])
    assert exit_info.value.code == 2
    assert "another config or other folds" in capsys.readouterr().err


def test_python_api_cross_validates_the_two_stage_cnn_on_the_same_path(report, data_dir, tmp_path, monkeypatch):
    from classifiers import cross_validate, write_report

    folds_dir = tmp_path / "folds"
    shutil.copytree(report / "two_stage_folds", folds_dir)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was retrained")

    monkeypatch.setattr(TwoStageModel, "fit", no_training)
    # The CLI's finished folds resume: same config, same folds, same fingerprint.
    result = cross_validate(data=data_dir, two_stage=TINY, two_stage_dir=folds_dir, n_folds=FOLDS, seed=0)
    assert [r.spec.name for r in result.runs] == TWO_STAGE_NAMES
    write_report(result, tmp_path / "report")
    before = pd.read_csv(report / "predictions.csv")
    mine = before[before["classifier"] == "two_stage"].reset_index(drop=True)
    after = pd.read_csv(tmp_path / "report" / "predictions.csv")
    pd.testing.assert_frame_equal(after.drop(columns="stores"), mine.drop(columns="stores"))
    with pytest.raises(ValueError, match="give `data` and `two_stage_dir`"):
        cross_validate(two_stage="cpu", data=data_dir)
    with pytest.raises(ValueError, match="`two_stage`: unknown two-stage preset 'fast'"):
        cross_validate(data=data_dir, two_stage="fast", two_stage_dir=tmp_path / "x")


def test_store_and_data_over_different_images_is_an_error(store, data_dir, tmp_path, capsys):
    fewer = tmp_path / "fewer"
    shutil.copytree(data_dir, fewer)
    (fewer / "benign" / "benign_0.png").unlink()
    (fewer / "manifest.csv").unlink()
    with pytest.raises(SystemExit) as exit_info:
        cv_report.main(["--features", str(store), "--data", str(fewer), "--out", str(tmp_path / "o"), *COMMON])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "do not hold the same images" in err
    assert "1 image(s) only in the feature store(s): benign/benign_0.png" in err
    assert not (tmp_path / "o").exists()  # before any training or report


@pytest.mark.parametrize("argv, message", [
    (["--classifier", "two_stage"], "needs the images: --data"),
    (["--data", "X", "--classifier", "logreg"], "--data is used by --classifier two_stage only"),
    (["--data", "X", "--classifier", "xgboost,two_stage"], "xgboost and logreg need --features"),
    ([], "give --features"),
])
def test_cli_input_combinations(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cv_report.main([*argv, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_config_presets_and_reserved_fields():
    cpu = preset_config("cpu", {"epochs": 3}, scheme="bmc3", seed=4)
    assert (cpu.scale, cpu.patch_size, cpu.stride, cpu.epochs, cpu.scheme, cpu.seed) == (0.25, 128, 64, 3, "bmc3", 4)
    assert preset_config("paper", scheme="bach4", seed=0).patch_size == 512
    with pytest.raises(ValueError, match="scheme"):
        preset_config("cpu", {"scheme": "binary"}, scheme="bach4", seed=0)
    with pytest.raises(ValueError, match="does not know"):
        preset_config("cpu", {"epoch": 3}, scheme="bach4", seed=0)


# --- the patch-wise network as a feature backend --------------------------------------------------


def test_two_stage_backbone_gives_the_maps_and_hidden_features(fold_model):
    from classifiers.two_stage.backbone import build_two_stage_features

    model = TwoStageModel.load(fold_model)
    net = build_two_stage_features(fold_model)
    patches = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    out = np.asarray(net(patches, training=False))
    assert out.shape == (3, 4, 4, 1 + 16 * 2)  # C maps, then the 16 w channels they are made of
    maps, _ = model.patch_outputs(patches)
    np.testing.assert_allclose(out[..., :1], maps, atol=1e-5)
    # Fully convolutional: a larger input is accepted (crops of any size, shared-map mode).
    assert np.asarray(net(np.zeros((1, 64, 96, 3), np.float32))).shape == (1, 8, 12, 33)


def test_extract_with_two_stage_backbone_feeds_cv_report_train_and_predict(fold_model, report, data_dir,
                                                                          tmp_path, capsys):
    root = tmp_path / "store"
    args = ["--data", str(data_dir), "--out", str(root), "--backbone", "two_stage",
            "--two-stage-model", str(fold_model), "--augmentations", "2", "--crops", "2", "--quiet"]
    assert extract_cli.main(args) == 0
    table = load_store(root)
    assert table.X.shape == (24 * 2, 33)
    config = table.config
    sha = hashlib.sha256((fold_model / "patch_net.keras").read_bytes()).hexdigest()
    assert config["backbone"] == "two_stage" and config["weights_sha256"] == sha
    assert config["crop_size"] == 32 and config["scale"] == 1.0 and config["stain"] is None  # the model's
    # Another model is another store (its hash is in the config).
    other = report / "two_stage_folds" / "fold-1" / "model"
    assert extract_cli.main(args[:6] + ["--two-stage-model", str(other)] + args[8:]) == 0
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2
    capsys.readouterr()

    out = tmp_path / "cv"
    cv_report.main(["--features", str(next(p for p in root.iterdir() if "two_stage" in p.name
                                           and load_store(p).config["weights_sha256"] == sha)),
                    "--out", str(out), "--classifier", "logreg", "--folds", str(FOLDS)])
    assert (out / "logreg" / "confusion.csv").is_file()

    # A deep-feature model on two-stage features predicts with the same model directory.
    store_dir = next(p for p in root.iterdir() if load_store(p).config["weights_sha256"] == sha)
    model_dir = tmp_path / "logreg-model"
    assert train_cli.main(["--features", str(store_dir), "--out", str(model_dir), "--classifier", "logreg"]) == 0
    images = sorted(str(p) for p in (data_dir / "insitu").glob("*.png"))[:2]
    # predict opens no path named in model.json: the two-stage model is given with --weights
    assert predict_cli.main(["--model", str(model_dir), *images, "--out", str(tmp_path / "p.csv"), "--quiet"]) == 2
    assert "--weights two_stage=FILE" in capsys.readouterr().err
    assert predict_cli.main(["--model", str(model_dir), *images, "--out", str(tmp_path / "p.csv"), "--quiet",
                             "--weights", f"two_stage={fold_model}"]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 2


def test_extract_two_stage_needs_a_model(data_dir, tmp_path, capsys):
    assert extract_cli.main(["--data", str(data_dir), "--out", str(tmp_path), "--backbone", "two_stage"]) == 2
    assert "--two-stage-model" in capsys.readouterr().err
    assert extract_cli.main(["--data", str(data_dir), "--out", str(tmp_path), "--backbone", "two_stage",
                             "--two-stage-model", str(tmp_path)]) == 2
    assert "not a two-stage model directory" in capsys.readouterr().err


# --- predict ---------------------------------------------------------------------------------------


def test_predict_accepts_a_two_stage_model(fold_model, data_dir, tmp_path, capsys):
    images = sorted(str(p) for p in (data_dir / "invasive").glob("*.png"))
    small = tmp_path / "small.png"
    from data.io import write_image

    write_image(small, np.full((20, 20, 3), 200, np.uint8))
    out = tmp_path / "pred.csv"
    assert predict_cli.main(["--model", str(fold_model), *images, str(small), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    classes = ["normal", "benign", "insitu", "invasive"]
    assert list(table.columns) == (["image", "prediction", "prediction_mean_proba", "n_aug"]
                                   + [f"proba_{c}" for c in classes] + [f"votes_{c}" for c in classes]
                                   + ["stain_note", "confidence", "low_confidence"])
    assert list(table["image"]) == images and (table["n_aug"] == 8).all()
    model = TwoStageModel.load(fold_model)
    expected = model.predict_proba(images, "two_stage", ensemble=True)
    np.testing.assert_allclose(table[[f"proba_{c}" for c in classes]].to_numpy(), expected, atol=1e-5)
    assert "small.png" in capsys.readouterr().out  # listed as skipped, with its reason
