"""Attention-MIL pooling (issue 15): the estimator on synthetic bags, and grouped CV through the
library's one CV loop."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from classifiers import CVConfig, InputDataError, build_dataset, run_cross_validation
from classifiers.feature.estimators import make_classifier
from classifiers.feature.mil import AttentionMILClassifier
from features.pooling import mean_of_instances
from features.store import FeatureTable

CLASSES = ("normal", "benign", "insitu", "invasive")
FAST = dict(hidden=32, attention=16, learning_rate=0.01, max_epochs=25, batch_size=16, patience=5)


def bags(n_images=48, n_aug=2, n_instances=6, n_features=8, seed=0):
    """Bags whose class shows in one instance only (feature = class index raised by 5): the
    other instances are noise, so the mean of a bag dilutes the signal six times."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % len(CLASSES)
    X = rng.normal(size=(n_images, n_aug, n_instances, n_features))
    where = rng.integers(n_instances, size=(n_images, n_aug))
    for i, label in enumerate(labels):
        X[i, np.arange(n_aug), where[i], label] += 5.0
    images = [f"{CLASSES[c]}/{i}.png" for i, c in enumerate(labels)]
    return (X.reshape(-1, n_instances, n_features).astype(np.float32), np.repeat(np.array(CLASSES)[labels], n_aug),
            np.repeat(images, n_aug))


def test_fit_predict_shapes_accuracy_and_attention():
    X, y, groups = bags(seed=0)
    model = AttentionMILClassifier(**FAST).fit(X, y, groups=groups)
    X_test, y_test, _ = bags(n_images=40, seed=1)
    proba = model.predict_proba(X_test)
    assert proba.shape == (80, 4) and set(model.classes_) == set(CLASSES)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (model.predict(X_test) == y_test).mean() >= 0.9
    assert 1 <= model.n_epochs_ <= 25 and len(model.history_["val_loss"]) >= model.n_epochs_
    attention = model.attention_weights(X_test)
    assert attention.shape == (80, 6)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-5)
    # The instance holding the signal gets more attention than the average instance (1/6).
    signal = np.abs(X_test).max(axis=2).argmax(axis=1)
    assert attention[np.arange(80), signal].mean() > 0.3


def test_a_rerun_gives_the_same_numbers_and_the_seed_matters():
    X, y, groups = bags(n_images=16, seed=2)
    first = AttentionMILClassifier(**FAST, random_state=3).fit(X, y, groups=groups).predict_proba(X)
    again = AttentionMILClassifier(**FAST, random_state=3).fit(X, y, groups=groups).predict_proba(X)
    other = AttentionMILClassifier(**FAST, random_state=4).fit(X, y, groups=groups).predict_proba(X)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_inner_split_keeps_groups_together_and_bad_input_is_refused():
    X, y, groups = bags(n_images=16, seed=0)
    model = AttentionMILClassifier(**FAST)
    model.classes_ = np.array(CLASSES)
    train, val = model._inner_split(pd.factorize(y)[0], groups, np.random.default_rng(0))
    assert not set(groups[train]) & set(groups[val]) and len(val) > 0
    with pytest.raises(ValueError, match="needs `groups`"):
        AttentionMILClassifier(**FAST).fit(X, y)
    with pytest.raises(ValueError, match=r"n_bags, n_instances, n_features.*--instances"):
        AttentionMILClassifier(**FAST).fit(X[:, 0], y, groups=groups)
    with pytest.raises(ValueError, match="`dropout` must be"):
        AttentionMILClassifier(dropout=1.5).fit(X, y, groups=groups)
    fitted = AttentionMILClassifier(**{**FAST, "max_epochs": 2}, validation_fraction=0).fit(X, y)
    assert fitted.n_epochs_ == 2 and fitted.history_["val_loss"] == []
    with pytest.raises(ValueError, match="fitted on 8"):
        fitted.predict_proba(X[..., :5])
    assert isinstance(make_classifier("mil", seed=7), AttentionMILClassifier)
    assert make_classifier("mil", seed=7).random_state == 7


def _table(X, y, images, instances=True):
    n_aug = pd.Series(images).groupby(images).cumcount().to_numpy()
    meta = pd.DataFrame({"image_id": images, "label": y, "group": images, "aug": n_aug})
    return FeatureTable(meta=meta, X=mean_of_instances(X), config={"backbone": "synthetic", "config_hash": "0" * 64},
                        instances=X if instances else None)


def test_cross_validation_of_mil_beside_the_mean_with_the_one_cv_loop(monkeypatch):
    import classifiers.feature.estimators as estimators

    build = estimators.make_classifier
    monkeypatch.setattr(estimators, "make_classifier",  # small network for a fast test
                        lambda name, **kw: AttentionMILClassifier(**FAST, random_state=kw["seed"]) if name == "mil"
                        else build(name, **kw))
    import classifiers.evaluation.cross_validation as cv

    monkeypatch.setattr(cv, "make_classifier", estimators.make_classifier)
    X, y, images = bags(n_images=48, seed=5)
    dataset = build_dataset([_table(X, y, images)], scheme="bach4")
    assert dataset.instances[0].shape == (96, 6, 8)
    result = run_cross_validation(dataset, CVConfig(classifiers=("mil", "logreg"), n_folds=3, tune=True))
    accuracy = {run.spec.name: (run.predictions["prediction"] == run.predictions["truth"]).mean()
                for run in result.runs}
    # Attention finds the one informative cell: 47 of 48 images against 44 for the bag means.
    assert accuracy["mil"] >= 46 / 48 and accuracy["logreg"] == pytest.approx(44 / 48)
    mil = result.runs[0]
    assert len(mil.predictions) == 48 and set(mil.predictions["fold"]) == {0, 1, 2}
    assert [p["fold"] for p in mil.chosen_params] == [0, 1, 2] and all(p["epochs"] >= 1 for p in mil.chosen_params)


def test_mil_on_a_store_without_instances_fails_before_training():
    X, y, images = bags(n_images=12, seed=0)
    dataset = build_dataset([_table(X, y, images, instances=False)], scheme="bach4")
    with pytest.raises(InputDataError, match="hold one vector per augmentation; extract an instance store"):
        run_cross_validation(dataset, CVConfig(classifiers=("logreg", "mil"), n_folds=3))


def _write_instance_store(root, X, y, images):
    """An instance store on disk as pipeline.extract writes it (cells-3x2: 6 instances)."""
    from features.config import ExtractionConfig
    from features.store import FeatureStore, make_record

    config = ExtractionConfig(backbone="synthetic", weights="none", augmentations=2, mode="whole", crops=1,
                              crop_size=0, instances="cells-3x2")
    with FeatureStore(root, config).open() as store:
        for image in dict.fromkeys(images):
            rows = np.flatnonzero(images == image)
            store.write(make_record(image_id=str(image), label=str(y[rows[0]]), group=str(image), path=f"/d/{image}",
                                    source_sha256="0" * 64, features=X[rows], stain_note=None))
    return store.path


def test_cv_report_runs_mil_on_an_instance_store_and_refuses_a_plain_one(tmp_path, monkeypatch, capsys):
    import classifiers.evaluation.cross_validation as cv
    from pipeline.cv_report import main

    build = cv.make_classifier
    monkeypatch.setattr(cv, "make_classifier", lambda name, **kw: AttentionMILClassifier(
        **FAST, random_state=kw["seed"]) if name == "mil" else build(name, **kw))
    X, y, images = bags(n_images=48, seed=5)
    store = _write_instance_store(tmp_path / "stores", X, y, images)
    out = tmp_path / "report"
    main(["--features", str(store), "--out", str(out), "--folds", "3", "--classifier", "mil,logreg", "--tune"])
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"mil", "logreg"}
    # The same folds and numbers as the library call of the test above.
    assert metrics["runs"]["mil"]["majority"]["accuracy"] >= 46 / 48
    assert metrics["runs"]["logreg"]["majority"]["accuracy"] == pytest.approx(44 / 48)
    paragraph = (out / "methods.txt").read_text()
    assert "gated attention-based multiple-instance pooling (Ilse et al. 2018)" in paragraph
    assert "averaged over each cell of a 3x2 grid" in paragraph
    plain = tmp_path / "plain"
    from features.store import load_store

    table = load_store(store)
    monkeypatch.setattr(table, "instances", None)
    from conftest import write_store

    plain_store = write_store(plain, table, "synthetic")
    with pytest.raises(SystemExit) as exit_info:
        main(["--features", str(plain_store), "--out", str(tmp_path / "r"), "--folds", "3", "--classifier", "mil"])
    assert exit_info.value.code == 2
    assert "hold one vector per augmentation; extract an instance store" in capsys.readouterr().err


def test_train_refuses_mil_with_the_reason():
    from classifiers.feature.model_io import TrainConfig

    with pytest.raises(ValueError, match="cross-validated only"):
        TrainConfig(classifier="mil").validate()
