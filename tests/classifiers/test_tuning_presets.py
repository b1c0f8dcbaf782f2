"""Inner-CV tuning, CV repeated over fold seeds, store names and presets."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from classifiers.evaluation.cv_dataset import build_dataset
from classifiers.evaluation.cross_validation import CVConfig, run_cross_validation
from classifiers.feature.estimators import SignedSquareRoot, make_logreg
from classifiers.feature.presets import PRESETS, PresetStoreError, get_preset, select_stores
from classifiers.evaluation.repeated import ensemble_markdown, ensemble_table, run_repeated_cv
from classifiers.feature.tuning import PARAM_GRIDS, InnerCVClassifier
from data.labels import map_labels
from conftest import synthetic_table, write_store

LOGREG_TUNED = CVConfig(classifiers=("logreg",), tune=True)


# --- InnerCVClassifier -----------------------------------------------------------------------------


def _grouped_blobs(n_groups=24, per_group=3, seed=0):
    """Two classes, one informative feature; rows of a group are near copies (augmentations)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_groups) % 2, per_group)
    groups = np.repeat(np.arange(n_groups), per_group)
    centres = rng.normal(size=(n_groups, 6))
    centres[:, 0] += 3.0 * (np.arange(n_groups) % 2)
    X = centres[groups] + rng.normal(scale=0.05, size=(len(y), 6))
    return X, y, groups


def test_inner_cv_chooses_from_the_grid_and_refits_on_all_rows():
    X, y, groups = _grouped_blobs()
    grid = {"logreg__C": [1e-4, 1.0]}
    model = InnerCVClassifier(make_logreg(), grid, random_state=0).fit(X, y, groups=groups)
    # With C=1e-4 the standardised logistic regression barely moves off 0.5; the inner CV
    # must see that the weaker penalty separates the classes better.
    assert model.best_params_ == {"logreg__C": 1.0}
    assert list(model.cv_scores_["params"]) == [{"C": 1e-4}, {"C": 1.0}]
    low, high = model.cv_scores_["mean_score"]
    assert high > low and high >= 0.8
    direct = make_logreg(C=1.0).fit(X, y)
    np.testing.assert_allclose(model.predict_proba(X), direct.predict_proba(X), rtol=1e-6)


def test_inner_cv_never_splits_a_group(monkeypatch):
    X, y, groups = _grouped_blobs(n_groups=12)
    seen = []

    class Spy(LogisticRegression):
        def fit(self, X, y):
            seen.append({tuple(np.round(r, 6)) for r in X})
            return super().fit(X, y)

    InnerCVClassifier(Spy(), {"C": [0.1, 1.0]}).fit(X, y, groups=groups)
    rows = {tuple(np.round(r, 6)): g for r, g in zip(X, groups)}
    for fitted_rows in seen[:-1]:  # the last fit is the refit on everything
        inside = {rows[r] for r in fitted_rows}
        outside = set(groups) - inside
        # every group is either wholly in this training split or wholly out of it
        assert all(rows[r] in inside for r in fitted_rows)
        assert sum(1 for r, g in rows.items() if g in inside) == len(fitted_rows)
        assert outside
    assert len(seen) == 2 * 3 + 1


def test_inner_cv_needs_groups_and_skips_when_a_class_has_one_group():
    X, y, groups = _grouped_blobs()
    with pytest.raises(ValueError, match="needs groups"):
        InnerCVClassifier(make_logreg(), PARAM_GRIDS["logreg"]).fit(X, y)
    groups = groups.copy()
    groups[y == 1] = 999  # class 1: a single patient
    model = InnerCVClassifier(make_logreg(C=0.5), PARAM_GRIDS["logreg"]).fit(X, y, groups=groups)
    assert model.best_params_ == {} and model.best_estimator_.named_steps["logreg"].C == 0.5


def test_cv_with_tuning_reports_one_choice_per_fold_and_store(tmp_path):
    tables = [synthetic_table(seed=1, backbone="a"), synthetic_table(seed=2, n_features=6, backbone="b")]
    config = CVConfig(classifiers=("logreg",), fusion=("mean-proba",), n_folds=4, tune=True)
    result = run_cross_validation(build_dataset(tables, "bach4"), config)
    fused = next(r for r in result.runs if r.spec.name == "logreg-mean-proba")
    assert [(p["fold"], p["store"]) for p in fused.chosen_params] == [
        (k, s) for k in range(4) for s in ("a", "b")]
    assert {p["C"] for p in fused.chosen_params} <= set(PARAM_GRIDS["logreg"]["logreg__C"])
    single = next(r for r in result.runs if r.spec.name == "logreg-a")
    assert single.chosen_params == [p for p in fused.chosen_params if p["store"] == "a"]
    assert (fused.predictions["truth"] == fused.predictions["prediction"]).mean() >= 0.95

    from classifiers.evaluation.report import write_report

    write_report(result, tmp_path)
    tuning = pd.read_csv(tmp_path / "tuning.csv")
    assert len(tuning) == 4 * 2 + 4 + 4 and set(tuning.columns) == {"run", "fold", "store", "C"}
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["tune"] is True


# --- repeated CV and the ensemble table --------------------------------------------------------------


def test_ensemble_table_numbers_are_the_per_seed_accuracies():
    table = synthetic_table(signal=1.2, seed=4)
    dataset = build_dataset([table], "bach4")
    results = run_repeated_cv(dataset, CVConfig(classifiers=("logreg",)), seeds=[0, 1, 2])
    assert [r.config.seed for r in results] == [0, 1, 2]
    folds = [r.folds.set_index("image_id")["fold"] for r in results]
    assert not folds[0].equals(folds[1])  # other seeds, other folds
    got = ensemble_table(results).iloc[0]
    per_seed, per_fold, binary = [], [], []
    for r in results:
        p = r.runs[0].predictions
        correct = p["truth"] == p["prediction"]
        per_seed.append(correct.mean())
        per_fold.extend(correct.groupby(p["fold"]).mean())
        to_binary = lambda v: map_labels(v.to_numpy(str), "binary", source_scheme="bach4")
        binary.append(np.mean(to_binary(p["truth"]) == to_binary(p["prediction"])))
    assert got["bach4_mean"] == pytest.approx(np.mean(per_seed))
    assert got["bach4_sd_seeds"] == pytest.approx(np.std(per_seed, ddof=1))
    assert got["bach4_sd_folds"] == pytest.approx(np.std(per_fold, ddof=1))
    assert got["binary_mean"] == pytest.approx(np.mean(binary))
    assert got["binary_mean"] >= got["bmc3_mean"] >= got["bach4_mean"]  # coarser can only merge errors away
    assert 0.5 < got["bach4_mean"] < 1.0 and got["seeds"] == 3
    markdown = ensemble_markdown(ensemble_table(results))
    assert f"{100 * got['bach4_mean']:.1f} ± {100 * got['bach4_sd_seeds']:.1f}" in markdown


def test_repeated_seeds_must_be_distinct():
    dataset = build_dataset([synthetic_table()], "bach4")
    with pytest.raises(ValueError, match="distinct"):
        run_repeated_cv(dataset, CVConfig(classifiers=("logreg",)), seeds=[1, 1])


def test_cli_seeds_writes_a_report_per_seed_and_the_table(tmp_path, capsys):
    from pipeline.cv_report import main

    store = write_store(tmp_path / "stores", synthetic_table(seed=1), "resnet50")
    out = tmp_path / "r"
    main(["--features", str(store), "--out", str(out), "--classifier", "logreg", "--folds", "4",
          "--seeds", "3", "5", "--tune"])
    assert (out / "seed-3" / "report.html").is_file() and (out / "seed-5" / "tuning.csv").is_file()
    table = pd.read_csv(out / "ensemble.csv")
    assert list(table["run"]) == ["logreg"] and table["seeds"].iloc[0] == 2
    assert "| logreg |" in (out / "ensemble.md").read_text() and "| logreg |" in capsys.readouterr().out


# --- store names and presets ------------------------------------------------------------------------------


def test_stores_of_one_backbone_are_named_by_what_differs():
    base = {"backbone": "efficientnet_lite0", "crops": 4, "crop_size": 750, "pooling": "mean"}
    configs = [
        {**base, "mode": "whole", "scale": 0.25, "config_hash": "a" * 64},
        {**base, "mode": "exact", "scale": 0.5, "config_hash": "b" * 64},
        {**base, "mode": "shared", "scale": 0.5, "pooling": "pnorm3", "config_hash": "c" * 64},
        {"backbone": "resnet50", "mode": "exact", "scale": 0.5, "config_hash": "d" * 64},
    ]
    tables = [synthetic_table(seed=i) for i in range(4)]
    for t, c in zip(tables, configs):
        t.config.clear()
        t.config.update(c)
    names = build_dataset(tables, "bach4").store_names
    assert names == ["efficientnet_lite0-whole-s0.25", "efficientnet_lite0-exact-s0.5-4x750",
                     "efficientnet_lite0-shared-s0.5-4x750-pnorm3", "resnet50"]


def _preset_stores(root, preset):
    from features.config import ExtractionConfig
    from features.store import FeatureStore

    for options in preset.stores:
        FeatureStore(root, ExtractionConfig(weights="none", **options)).open()


def test_select_stores_finds_each_preset_store_by_config(tmp_path):
    for preset in PRESETS.values():
        _preset_stores(tmp_path / "root", preset)
    from features.config import ExtractionConfig
    from features.store import FeatureStore

    other = FeatureStore(tmp_path / "root", ExtractionConfig(weights="none")).open()  # not a preset's
    for preset in PRESETS.values():  # each finds its own stores among all of them
        chosen = select_stores(preset, [tmp_path / "root"])
        assert len(chosen) == len(preset.stores)
        for path, options in zip(chosen, preset.stores):
            config = json.loads((path / "config.json").read_text())
            assert {k: config[k] for k in options} == options
    with pytest.raises(PresetStoreError, match="pipeline.extract --preset bach"):
        select_stores(get_preset("bach"), [other.path])  # a store, but not the preset's
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")


def test_preset_states_its_expected_extraction_time():
    line = get_preset("bach").expected_time(300)  # 300 x 2.3 s
    assert line.startswith("preset bach: expect about 12 min for 300 images on 2 CPU cores (2.3 s per")
    assert "about 1 min for 10 images" in get_preset("bach-fast").expected_time(10)  # never "0 min"


def test_preset_bach_cross_validates_and_trains_its_classifier(tmp_path):
    """``--preset bach`` reads its store under the root and uses the preset's classifier and tuning."""
    from classifiers.feature.model_io import load_model
    from pipeline import cv_report, train

    preset = get_preset("bach")
    (options,) = preset.stores  # one store
    table = synthetic_table(n_per_class=(6, 6, 6, 6), n_aug=options["augmentations"], n_features=8)
    fields = {k: v for k, v in options.items() if k not in ("backbone", "augmentations")}
    write_store(tmp_path / "root", table, options["backbone"], **fields)
    write_store(tmp_path / "root", synthetic_table(n_aug=2, seed=1), "efficientnet_lite0")  # ignored
    out = tmp_path / "cv"
    cv_report.main(["--preset", "bach", "--features", str(tmp_path / "root"), "--out", str(out),
                    "--folds", "3", "--seeds", "0"])
    runs = pd.read_csv(out / "ensemble.csv")["run"].tolist()
    assert runs == [preset.classifier]
    assert (out / "seed-0" / "tuning.csv").is_file()  # the preset tunes
    assert train.main(["--preset", "bach", "--features", str(tmp_path / "root"),
                       "--out", str(tmp_path / "model")]) == 0
    model = load_model(tmp_path / "model")
    assert model.classifier == preset.classifier == "logreg-sqrt"
    (estimator,) = model.fitted.estimators
    assert isinstance(estimator[0], SignedSquareRoot)  # loaded as saved: sqrt -> scale -> logreg
    assert model.params["C"] in PARAM_GRIDS["logreg-sqrt"]["logreg__C"]


def test_extract_preset_refuses_options_it_sets(tmp_path, capsys):
    from pipeline import extract as cli

    assert cli.main(["--data", "synthetic", "--out", str(tmp_path), "--preset", "bach",
                     "--crops", "3"]) == 2
    assert "--preset bach sets --crops" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["--data", "d", "--out", "o", "--preset", "bach", "--seed", "4"])
    stores = cli.store_options(args)
    assert [(s.scale, s.mode, s.seed) for s in stores] == [
        (o["scale"], o["mode"], 4) for o in PRESETS["bach"].stores]
    args = cli.build_parser().parse_args(["--data", "d", "--out", "o", "--scale", "0.5", "0.25"])
    assert [s.scale for s in cli.store_options(args)] == [0.5, 0.25]
