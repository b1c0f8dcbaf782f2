"""Heatmaps: window grids, upsampling, files, the deep-feature path and the CLI."""
import json
import os

# One passive OpenMP runtime for the shared cores (see pipeline/cv_report.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from classifiers.heatmaps import (
    FeatureSource,
    Heatmap,
    axis_starts,
    coverage_average,
    feature_heatmap,
    pooled_window_features,
    render_overlay,
    save_heatmap,
    sliding_window_heatmap,
    window_grid,
)
from data.io import read_image, write_image
from data.synthetic import make_image
from features.config import ExtractionConfig
from pipeline import heatmap as heatmap_cli

SIZE = (128, 160)
TUMOUR_BOX = (0, 0, 128, 80)  # left half: (y0, x0, y1, x1)


# ---------------------------------------------------------------------------------------------
# window grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,side,step", [(100, 32, 8), (100, 32, 30), (101, 32, 32), (64, 64, 16),
                                              (33, 32, 100), (750, 750, 128), (1536, 750, 128)])
def test_axis_starts_cover_every_pixel_and_end_flush(length, side, step):
    starts = axis_starts(length, side, step)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + side] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] == length - side  # both borders are window edges
    assert np.all(np.diff(starts) > 0) and np.all(np.diff(starts) <= step)


def test_window_grid_covers_the_image_borders_included():
    grid = window_grid(100, 130, 32, 24)
    count = np.zeros((100, 130), int)
    for y, x, side in grid.windows:
        assert side == 32 and y + side <= 100 and x + side <= 130
        count[y:y + side, x:x + side] += 1
    assert count.min() >= 1
    assert grid.ys[-1] == 100 - 32 and grid.xs[-1] == 130 - 32
    assert grid.shape == (len(grid.ys), len(grid.xs)) and len(grid.windows) == grid.shape[0] * grid.shape[1]


def test_window_larger_than_the_image_is_one_window_of_its_shorter_side():
    grid = window_grid(60, 90, 750, 128)
    assert grid.side == 60 and grid.ys.tolist() == [0] and grid.xs.tolist() == [0, 30]


@pytest.mark.parametrize("window,step", [(0, 8), (32, 0)])
def test_window_grid_refuses_non_positive_sizes(window, step):
    with pytest.raises(ValueError, match="must be >= 1"):
        window_grid(64, 64, window, step)


def test_coverage_average_is_the_mean_of_the_covering_windows():
    grid = window_grid(40, 50, 16, 10)
    values = np.random.default_rng(0).random((*grid.shape, 2))
    got = coverage_average(values, grid)
    total, count = np.zeros((40, 50, 2)), np.zeros((40, 50, 1))
    for (r, c), (y, x, s) in zip(np.ndindex(grid.shape), grid.windows):
        total[y:y + s, x:x + s] += values[r, c]
        count[y:y + s, x:x + s] += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


def test_sliding_window_heatmap_puts_each_window_in_its_cell():
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)

    def red_share(crops):  # a "classifier" whose output is easy to recompute per window
        p = crops[..., 0].mean(axis=(1, 2)) / 255.0
        return np.column_stack([1 - p, p])

    hm = sliding_window_heatmap(image, red_share, ("other", "red"), window=20, step=7, batch_size=5)
    for r, y in enumerate(hm.grid.ys):
        for c, x in enumerate(hm.grid.xs):
            assert hm.class_map("red")[r, c] == pytest.approx(image[y:y + 20, x:x + 20, 0].mean() / 255, abs=1e-6)
    assert hm.to_image().shape == (50, 70, 2)
    assert hm.prediction in ("other", "red")
    with pytest.raises(ValueError, match="unknown class"):
        hm.class_map("blue")


def test_heatmap_files_and_overlay(tmp_path):
    grid = window_grid(48, 64, 32, 16)
    proba = np.random.default_rng(2).dirichlet(np.ones(4), size=grid.shape).astype(np.float32)
    hm = Heatmap(proba, grid, ("normal", "benign", "insitu", "invasive"), scale=0.5, method="test")
    paths = save_heatmap(hm, tmp_path, "img", image="some/img.png")
    np.testing.assert_array_equal(np.load(paths["insitu"]), proba[..., 2])
    record = json.loads(paths["json"].read_text())
    assert record["grid"]["ys"] == grid.ys.tolist() and record["scale"] == 0.5
    assert record["prediction"] == hm.prediction and set(record["files"]) == set(hm.classes)
    image = np.full((48, 64, 3), 200, np.uint8)
    png = render_overlay(image, hm, tmp_path / "img.png", title="img")
    assert read_image(png).shape[1] > 4 * 64  # image + four class panels
    with pytest.raises(ValueError, match="heatmap grid covers"):
        render_overlay(image[:40], hm, tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# deep features: the map is computed once and pooled per window
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    from features.extract import FeatureExtractor

    return FeatureExtractor(ExtractionConfig(weights="none", crop_size=64, augmentations=1, crops=2,
                                             scale=1.0), batch_size=1)


@pytest.fixture(scope="module")
def window_classifier(extractor):
    """Logistic regression on pooled 64-pixel window features of normal vs invasive images."""
    from classifiers.feature.estimators import make_logreg

    X, y = [], []
    for k, label in enumerate(("normal", "invasive")):
        for i in range(4):
            image = make_image(label, np.random.default_rng([2, i, k]), SIZE)
            X.append(pooled_window_features(image, extractor, window_grid(*SIZE, 64, 32)))
            y += [label] * len(X[-1])
    return make_logreg().fit(np.concatenate(X), np.array(y, dtype=object))


def inside_minus_outside(pixel_map: np.ndarray, box) -> float:
    inside = np.zeros(pixel_map.shape, bool)
    inside[box[0]:box[2], box[1]:box[3]] = True
    return float(pixel_map[inside].mean() - pixel_map[~inside].mean())


def test_deep_feature_heatmap_is_higher_inside_the_tumour_region(extractor, window_classifier):
    image = make_image("normal", np.random.default_rng([3, 0]), SIZE, tumour_region=TUMOUR_BOX)
    hm = feature_heatmap(image, FeatureSource(extractor), window_classifier, window=64, step=16)
    assert hm.grid.shape == (5, 7) and hm.classes == ("invasive", "normal")
    assert inside_minus_outside(hm.to_image()[..., hm.class_index("invasive")], TUMOUR_BOX) > 0.3
    # The exact path classifies the same windows, one backbone pass each.
    exact = feature_heatmap(image, [FeatureSource(extractor)], _ListClassifier(window_classifier),
                            window=64, step=16, classes=hm.classes, exact=True)
    assert exact.grid.windows.tolist() == hm.grid.windows.tolist() and "window by window" in exact.method


class _ListClassifier:
    """Takes the list of every source's features, as FittedModel.predict_proba does."""

    def __init__(self, estimator):
        self.estimator = estimator

    def predict_proba(self, Xs):
        return self.estimator.predict_proba(np.hstack(Xs))


def test_feature_heatmap_refuses_sources_with_different_scales(extractor, window_classifier):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="resize images differently"):
        feature_heatmap(image, [FeatureSource(extractor, 1.0), FeatureSource(extractor, 0.5)],
                        window_classifier, window=32, step=32)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_model_dir(extractor, window_classifier, tmp_path_factory):
    """A pipeline.train-style model directory around the in-memory logistic regression."""
    from classifiers.evaluation.cross_validation import FittedModel, RunSpec
    from classifiers.feature.model_io import TrainedModel, save_model

    config = extractor.config
    fitted = FittedModel(RunSpec("logreg", "logreg", "single", (0,)), [window_classifier], [(0,)],
                         ("normal", "benign", "insitu", "invasive"))
    model = TrainedModel(fitted=fitted, scheme="bach4", classifier="logreg", params={"C": 0.1}, fusion="single",
                         store_names=["synthetic"], store_configs=[{**config.to_dict(),
                                                                    "config_hash": config.config_hash}],
                         feature_dims=[1280], absent_classes=("benign", "insitu"))
    return save_model(model, tmp_path_factory.mktemp("models") / "features")


@pytest.fixture(scope="module")
def tumour_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "tumour_left.png"
    write_image(path, make_image("normal", np.random.default_rng([3, 0]), SIZE, tumour_region=TUMOUR_BOX))
    return path


def test_cli_heatmap_of_a_feature_model(feature_model_dir, tumour_image, tmp_path, capsys):
    out = tmp_path / "maps"
    code = heatmap_cli.main(["--model", str(feature_model_dir), str(tumour_image), "--window", "64",
                             "--step", "16", "--out", str(out), "--classes", "invasive", "normal"])
    assert code == 0
    record = json.loads((out / "tumour_left.heatmap.json").read_text())
    assert record["image_source"].startswith("model vote over 1 augmentations")
    invasive = np.load(out / "tumour_left.invasive.npy")
    assert invasive.shape == (5, 7) and invasive[:, :2].mean() > invasive[:, -2:].mean() + 0.3
    assert (out / "tumour_left.heatmap.png").is_file()
    assert "whole image" in capsys.readouterr().out


def test_cli_errors_exit_2_with_a_message(feature_model_dir, tumour_image, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "missing"), str(tumour_image)], "model directory not found"),
        (["--model", str(tmp_path), str(tumour_image)], "not a model directory"),
        (["--model", str(feature_model_dir), str(tmp_path / "none.png")], "no readable image"),
        (["--model", str(feature_model_dir), str(tumour_image), "--classes", "tumour"], "not among the model"),
        (["--model", str(feature_model_dir), str(tumour_image), "--step", "0"], "must be >= 1"),
    ]
    for argv, message in cases:
        assert heatmap_cli.main(argv + ["--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err


def test_cli_heatmap_of_a_two_stage_model_uses_its_patch_wise_network(tmp_path, capsys):
    from classifiers.two_stage.model import TwoStageConfig, TwoStageModel

    config = TwoStageConfig(scheme="binary", patch_size=32, patch_width=2, image_width=2, dense_units=(4,))
    TwoStageModel(config).initialize((2, 2)).save(tmp_path / "two_stage")  # untrained: geometry only
    rng = np.random.default_rng(0)
    write_image(tmp_path / "fits.png", rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    write_image(tmp_path / "other.png", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))  # 3x3 grid
    argv = ["--model", str(tmp_path / "two_stage"), str(tmp_path / "fits.png"), str(tmp_path / "other.png"),
            "--step", "8", "--out", str(tmp_path / "maps")]
    assert heatmap_cli.main(argv) == 0
    fits = json.loads((tmp_path / "maps" / "fits.heatmap.json").read_text())
    other = json.loads((tmp_path / "maps" / "other.heatmap.json").read_text())
    assert fits["grid"]["side"] == 32 and fits["image_source"] == "two-stage prediction"
    assert np.load(tmp_path / "maps" / "fits.carcinoma.npy").shape == (5, 7)
    assert other["image_source"].startswith("mean of") and "no two-stage prediction" in other["notes"][0]
    assert heatmap_cli.main(argv + ["--window", "64"]) == 2
    assert "32-pixel windows only" in capsys.readouterr().err
