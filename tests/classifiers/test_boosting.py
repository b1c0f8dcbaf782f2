"""The boosters with early stopping (xgboost-es, lightgbm): inner split, rounds, CV, save/load."""

import hashlib
import json
import os
import sys

# One passive OpenMP runtime for the shared cores (see pipeline/cv_report.py); before xgboost loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest

from classifiers.evaluation.cross_validation import CVConfig, RunSpec, fit_run_model
from classifiers.evaluation.cv_dataset import build_dataset
from classifiers.feature import boosting
from classifiers.feature.boosting import (LightGBMFeatureClassifier, LightGBMMissingError,
                                          XGBoostEarlyStoppingClassifier, grouped_holdout)
from classifiers.feature.estimators import make_classifier
from classifiers.feature.model_io import MODEL_FILE, ModelFormatError, TrainConfig, load_model, save_model, train_model
from conftest import synthetic_table, write_store

pytest.importorskip("lightgbm")  # the test extra installs it (setup.cfg)

BOOSTERS = {
    "xgboost-es": lambda **kw: XGBoostEarlyStoppingClassifier(device="cpu", n_jobs=1, **kw),
    "lightgbm": lambda **kw: LightGBMFeatureClassifier(n_jobs=1, **kw),
}


def _grouped_blobs(n_images=60, n_aug=4, n_classes=3, signal=3.0, seed=0):
    """Rows of ``n_images`` images (``n_aug`` augmentations each); class = image % n_classes."""
    rng = np.random.default_rng(seed)
    image = np.repeat(np.arange(n_images), n_aug)
    label = image % n_classes
    centres = rng.normal(size=(n_images, 10))
    X = centres[image] + 0.3 * rng.normal(size=(len(image), 10))
    X[:, 0] += signal * label
    return X.astype(np.float32), np.array(["benign", "insitu", "invasive", "normal"])[label], image


def test_grouped_holdout_keeps_groups_on_one_side_and_every_class_in_training():
    codes = np.repeat(np.arange(40) % 4, 5)
    groups = np.repeat(np.arange(40), 5)
    train, val = grouped_holdout(codes, groups, 0.2, random_state=3)
    assert set(groups[train]).isdisjoint(groups[val])
    assert sorted(np.concatenate([train, val])) == list(range(200))
    assert len(np.unique(groups[val])) == 8  # a fifth of the 40 images, 2 per class
    assert np.bincount(codes[val], minlength=4).tolist() == [10, 10, 10, 10]
    # A class with a single group cannot be both held out and trained on: no split.
    assert grouped_holdout(np.array([0, 0, 1, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2]), 0.5, 0) is None
    with pytest.raises(ValueError, match="needs `groups`"):
        grouped_holdout(codes, None, 0.2, 0)


@pytest.mark.parametrize("name", list(BOOSTERS))
def test_early_stopping_finds_fewer_rounds_on_a_grouped_split_then_refits(name):
    X, y, groups = _grouped_blobs()
    clf = BOOSTERS[name](n_estimators=400, early_stopping_rounds=10).fit(X, y, groups=groups)
    train, val = clf.inner_split_
    assert set(groups[train]).isdisjoint(groups[val]) and len(train) + len(val) == len(y)
    assert 1 <= clf.n_rounds_ < 400 and clf.validation_loss_ < np.log(3)  # better than a uniform guess
    # refit: the kept booster has exactly the rounds found, trained on all rows
    rounds = (clf.booster_.current_iteration() if name == "lightgbm"
              else clf.booster_.get_booster().num_boosted_rounds())
    assert rounds == clf.n_rounds_
    proba = clf.predict_proba(X)
    assert clf.classes_.tolist() == ["benign", "insitu", "invasive"] and proba.shape == (240, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (clf.predict(X) == y).mean() > 0.9
    again = BOOSTERS[name](n_estimators=400, early_stopping_rounds=10).fit(X, y, groups=groups)
    np.testing.assert_array_equal(again.predict_proba(X), proba)  # seeded


@pytest.mark.parametrize("name", list(BOOSTERS))
def test_boosters_handle_two_classes_and_refuse_bad_input(name):
    X, y, groups = _grouped_blobs(n_classes=2)
    clf = BOOSTERS[name](n_estimators=200, early_stopping_rounds=10).fit(X, y, groups=groups)
    assert clf.predict_proba(X).shape == (240, 2) and (clf.predict(X) == y).mean() > 0.9
    with pytest.raises(ValueError, match="needs `groups`"):
        BOOSTERS[name]().fit(X, y)
    with pytest.raises(ValueError, match="groups has 3 entries for 240 rows"):
        BOOSTERS[name]().fit(X, y, groups=[1, 2, 3])
    with pytest.raises(ValueError, match=r"validation_fraction must be a number in \[0, 0.5\]"):
        BOOSTERS[name](validation_fraction=0.8).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="early_stopping_rounds must be an integer >= 1"):
        BOOSTERS[name](early_stopping_rounds=0).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="at least 2 classes"):
        BOOSTERS[name]().fit(X, np.full(len(y), "a"), groups=groups)
    # validation_fraction=0: no inner split, no groups needed, all the rounds
    fixed = BOOSTERS[name](n_estimators=7, validation_fraction=0).fit(X, y)
    assert fixed.n_rounds_ == 7 and fixed.inner_split_ is None


@pytest.mark.parametrize("name", list(BOOSTERS))
def test_boosters_pass_sklearn_estimator_checks(name):
    import warnings

    from sklearn.utils.estimator_checks import check_estimator

    # Without the inner split (scikit-learn's checks call fit(X, y) without groups).
    extra = {"min_child_samples": 1} if name == "lightgbm" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(BOOSTERS[name](n_estimators=5, validation_fraction=0, **extra), on_fail=None)
    assert [r["check_name"] for r in results if r["status"] == "failed"] == []


def test_documented_defaults():
    p = make_classifier("lightgbm", seed=4, n_jobs=2).get_params()
    assert (p["n_estimators"], p["learning_rate"], p["num_leaves"], p["max_depth"]) == (2000, 0.05, 15, 4)
    assert (p["colsample_bytree"], p["subsample"], p["early_stopping_rounds"], p["random_state"]) == (0.3, 0.8, 50, 4)
    p = make_classifier("xgboost-es", seed=4, device="cpu").get_params()
    assert (p["n_estimators"], p["learning_rate"], p["max_depth"], p["colsample_bytree"]) == (2000, 0.05, 3, 0.3)
    assert (p["validation_fraction"], p["refit"], p["device"]) == (0.2, True, "cpu")


@pytest.mark.parametrize("name", list(BOOSTERS))
def test_cv_early_stopping_sees_only_the_training_fold(name, monkeypatch):
    """Inside an outer fold, the rows early stopping trains and validates on are training-fold rows
    only, and no image (or patient) is on both sides of the inner split."""
    assign = np.random.default_rng(1).permutation(48)
    table = synthetic_table(patients=lambda i: f"patient-{assign[i] // 2:02d}")  # 2 images per patient
    dataset = build_dataset([table], "bach4")
    row_of = {row.tobytes(): k for k, row in enumerate(dataset.X[0])}
    groups = dataset.images["group"].to_numpy()[dataset.row_image]
    seen = []
    cls = type(make_classifier(name, device="cpu"))
    real = cls._boost

    def spy(self, X, codes, rounds, X_val, codes_val, **options):
        seen.append((X, X_val))
        return real(self, X, codes, rounds, X_val, codes_val, **options)

    monkeypatch.setattr(cls, "_boost", spy)
    config = CVConfig(classifiers=(name,), n_folds=4, seed=0, n_jobs=1, device="cpu", tune=True)
    test_rows = np.flatnonzero(np.isin(groups, np.unique(groups)[::4]))  # 6 whole patients of 24 held out
    train_rows = np.setdiff1d(np.arange(len(groups)), test_rows)
    fitted = fit_run_model(dataset, RunSpec(name, name, "single", (0,)), config, rows=train_rows, device="cpu")
    (inner_train, inner_val), (refit_rows, no_val) = seen
    assert no_val is None
    inner_train = [row_of[r.tobytes()] for r in inner_train]
    inner_val = [row_of[r.tobytes()] for r in inner_val]
    refit_rows = [row_of[r.tobytes()] for r in refit_rows]
    assert sorted(refit_rows) == sorted(train_rows)  # the refit uses every training row, no test row
    assert sorted(inner_train + inner_val) == sorted(train_rows)
    assert set(groups[inner_train]).isdisjoint(groups[inner_val])
    assert set(groups[inner_val]).isdisjoint(groups[test_rows])
    assert fitted.chosen_params == [{"rounds": fitted.estimators[0].n_rounds_}]


@pytest.mark.parametrize("name", list(BOOSTERS))
def test_save_load_round_trip_gives_identical_probabilities(name, tmp_path):
    dataset = build_dataset([synthetic_table(seed=2, signal=1.0)], "bach4")  # overlapping: stops early
    trained = train_model(dataset, TrainConfig(classifier=name, n_jobs=1, device="cpu"))
    assert 1 <= trained.training["rounds"][0] < 2000
    expected = trained.fitted.predict_proba(dataset.X)
    out = save_model(trained, tmp_path / "m")
    suffix = ".txt" if name == "lightgbm" else ".json"
    assert [p.name for p in sorted(out.iterdir())] == [f"estimator-0{suffix}", MODEL_FILE]
    model = load_model(out)
    assert model.classifier == name and type(model.fitted.estimators[0]) is type(trained.fitted.estimators[0])
    assert model.params["early_stopping_rounds"] == 50
    np.testing.assert_array_equal(model.fitted.predict_proba(dataset.X), expected)


@pytest.mark.parametrize("name", list(BOOSTERS))
def test_kept_early_stopped_booster_saves_its_best_rounds(name, tmp_path):
    X, y, groups = _grouped_blobs(n_classes=4)
    clf = BOOSTERS[name](n_estimators=300, early_stopping_rounds=10, refit=False).fit(X, y, groups=groups)
    from classifiers.feature import model_io

    save, load = ((model_io.save_lightgbm, model_io.load_lightgbm) if name == "lightgbm" else
                  (model_io.save_xgboost, lambda *a: model_io.load_xgboost(*a, XGBoostEarlyStoppingClassifier)))
    path = tmp_path / ("b.txt" if name == "lightgbm" else "b.json")
    save(clf, path)
    loaded = load(path, list(clf.classes_), clf.get_params(), 10)
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    best = clf.booster_.get_booster().best_iteration + 1 if name == "xgboost-es" else clf.booster_.current_iteration()
    assert best == clf.n_rounds_ < 300


def test_crafted_lightgbm_file_is_refused(tmp_path):
    dataset = build_dataset([synthetic_table(seed=2, signal=1.0)], "bach4")  # overlapping: stops early
    out = save_model(train_model(dataset, TrainConfig(classifier="lightgbm", n_jobs=1)), tmp_path / "m")
    path = out / "estimator-0.txt"
    text = path.read_text()
    first = text.index("left_child=")
    path.write_text(text[:first] + "left_child=99" + text[first + len("left_child=") + 1:])
    record = json.loads((out / MODEL_FILE).read_text())
    record["estimators"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / MODEL_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelFormatError, match="tree 0: node 0 has child 99 outside"):
        load_model(out)
    # An XGBoost file named as a LightGBM model's estimator is refused by its suffix.
    record["estimators"][0]["file"] = "estimator-0.json"
    (out / "estimator-0.json").write_bytes(path.read_bytes())
    (out / MODEL_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelFormatError, match="a lightgbm model must be an estimator-<k>.txt file"):
        load_model(out)


def test_missing_lightgbm_is_one_clear_error(monkeypatch, tmp_path, capsys):
    from pipeline.cv_report import main

    dataset = build_dataset([synthetic_table(seed=2, signal=1.0)], "bach4")  # overlapping: stops early
    model_dir = save_model(train_model(dataset, TrainConfig(classifier="lightgbm", n_jobs=1)), tmp_path / "m")
    store = write_store(tmp_path / "stores", synthetic_table(seed=1), "resnet50")
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # import lightgbm -> ImportError
    with pytest.raises(LightGBMMissingError, match="pip install lightgbm"):
        CVConfig(classifiers=("lightgbm",)).validate()
    with pytest.raises(LightGBMMissingError, match="pip install lightgbm"):
        load_model(model_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["--features", str(store), "--out", str(tmp_path / "r"), "--classifier", "lightgbm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(boosting.LIGHTGBM_INSTALL_HINT) and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "r").exists()


def test_cv_report_cli_runs_the_boosters_beside_logreg(tmp_path):
    from pipeline.cv_report import main

    store = write_store(tmp_path / "stores", synthetic_table(seed=1, signal=1.5), "resnet50")  # overlapping
    out = tmp_path / "report"
    main(["--features", str(store), "--out", str(out), "--folds", "4", "--n-jobs", "1", "--device", "cpu",
          "--classifier", "logreg,xgboost-es,lightgbm", "--tune"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"logreg", "xgboost-es", "lightgbm"}
    accuracy = {name: run["majority"]["accuracy"] for name, run in metrics["runs"].items()}
    assert min(accuracy.values()) >= 0.8, accuracy  # 4 classes, chance 0.25
    tuning = pd.read_csv(out / "tuning.csv")
    rounds = tuning.loc[tuning["run"].isin(["xgboost-es", "lightgbm"]), "rounds"]
    assert len(rounds) == 8 and rounds.between(1, 1999).all()
    methods = {c["name"]: c for c in metrics["methods"]["classifiers"]}
    assert "early stopping" in methods["lightgbm"]["words"] and methods["lightgbm"]["params"]["num_leaves"] == 15
    lgb = tuning.loc[tuning["run"] == "lightgbm", "rounds"].astype(int)
    spread = f"{lgb.min()} to {lgb.max()} (median {np.median(lgb):g}) rounds"
    assert f"early stopping kept {spread} over the training folds" in (out / "methods.txt").read_text()
