"""The nuclear_stats backbone: hand-crafted statistics of the haematoxylin channel (issue 15)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from features.backbones import get_backbone
from features.config import ExtractionConfig
from features.extract import extract_to_store, make_config, make_extractor
from features.nuclear import FEATURE_NAMES, nuclear_statistics
from features.store import load_store

NUCLEAR_WHOLE = dict(backbone="nuclear_stats", stain_reference="none", augmentations=3, scale=1.0,
                     mode="whole")


def _discs(n_rows=3, n_cols=4, radius=6, size=(120, 160)):
    """Pink eosin background with ``n_rows x n_cols`` dark purple (haematoxylin) discs."""
    image = np.empty(size + (3,), np.uint8)
    image[:] = (235, 170, 200)
    ys = np.linspace(20, size[0] - 20, n_rows).astype(int)
    xs = np.linspace(20, size[1] - 20, n_cols).astype(int)
    for y in ys:
        for x in xs:
            cv2.circle(image, (int(x), int(y)), radius, (70, 40, 130), -1)
    return image


def test_statistics_count_and_measure_the_nuclei():
    stats = dict(zip(FEATURE_NAMES, nuclear_statistics(_discs())))
    assert len(FEATURE_NAMES) == 41 == get_backbone("nuclear_stats").feature_dim
    assert stats["density"] == pytest.approx(12 / (120 * 160) * 1e4, rel=1e-6)  # 12 discs found
    # a disc of radius 6 drawn by OpenCV: 113 px (pi r^2 = 113.1), opened by a 3x3 square
    assert 100 <= stats["area_p50"] <= 125 and stats["area_sd"] < 1.0
    assert stats["eccentricity_mean"] < 0.3 and stats["solidity_mean"] > 0.9  # round, convex
    assert stats["nuclear_fraction"] == pytest.approx(12 * stats["area_mean"] / (120 * 160), rel=1e-5)
    larger = dict(zip(FEATURE_NAMES, nuclear_statistics(_discs(radius=9))))
    assert larger["area_p50"] > 2 * stats["area_p50"] and larger["density"] == stats["density"]


def test_statistics_of_an_image_without_nuclei_are_finite():
    blank = np.full((64, 64, 3), 230, np.uint8)
    stats = nuclear_statistics(blank)
    assert stats.dtype == np.float32 and stats.shape == (41,) and np.isfinite(stats).all()
    assert stats[FEATURE_NAMES.index("density")] == 0
    with pytest.raises(ValueError, match="RGB uint8"):
        nuclear_statistics(blank.astype(np.float32))
    with pytest.raises(ValueError, match="at least 32 px"):
        nuclear_statistics(blank[:20])


def test_extraction_stores_the_statistics_once_per_augmentation_row(tiny_dataset, tmp_path):
    config = make_config(tiny_dataset, **NUCLEAR_WHOLE)
    assert config.weights == "none" and config.weights_sha256 is None  # nothing to load
    summary = extract_to_store(tiny_dataset, config, tmp_path, progress=False)
    table = load_store(summary.store_path)
    assert table.X.shape == (len(tiny_dataset) * 3, 41)
    first = table.meta.index[table.meta["image_id"] == table.meta["image_id"].iloc[0]]
    np.testing.assert_array_equal(table.X[first], np.repeat(table.X[first[:1]], 3, axis=0))
    path = table.meta.loc[first[0], "path"]
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_allclose(table.X[first[0]], nuclear_statistics(rgb), rtol=1e-6)
    assert summary.device.startswith("CPU (hand-crafted")


def test_nuclear_stats_refuses_options_that_need_a_network():
    base = ExtractionConfig(backbone="nuclear_stats", weights="none", augmentations=2, mode="whole",
                            crops=1, crop_size=0)
    for options, message in ((dict(mode="shared", crops=2, crop_size=48), "use --mode whole"),
                             (dict(engine="openvino"), "runs no network"),
                             (dict(instances="cells-2x2"), "no feature map")):
        config = ExtractionConfig(**{**base.__dict__, **options})
        with pytest.raises(ValueError, match=message):
            make_extractor(config)
    with pytest.raises(ValueError, match="heatmaps"):
        make_extractor(base).feature_maps(np.zeros((1, 64, 64, 3), np.uint8))


def test_missing_scikit_image_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError("No module named 'skimage'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    config = ExtractionConfig(backbone="nuclear_stats", weights="none", augmentations=2, mode="whole",
                              crops=1, crop_size=0)
    with pytest.raises(ValueError, match="pip install scikit-image"):
        make_extractor(config)


def test_predict_names_each_stores_device_when_they_differ(tiny_dataset, tmp_path):
    from classifiers import predict_images, train

    nuclear = extract_to_store(tiny_dataset, make_config(tiny_dataset, **{**NUCLEAR_WHOLE, "augmentations": 2}),
                               tmp_path / "features", progress=False)
    cnn = extract_to_store(tiny_dataset, make_config(
        tiny_dataset, backbone="efficientnet_lite0", weights=None, stain_reference="none", augmentations=2,
        scale=1.0, mode="whole"), tmp_path / "features", progress=False)
    model = train([cnn.store_path, nuclear.store_path], classifier="logreg", fusion="concat")
    result = predict_images(model, list(tiny_dataset["path"][:2]))
    assert len(result.table) == 2
    cnn_name, nuclear_name = model.trained.store_names
    assert result.device == (f"{cnn_name}: {cnn.device}; {nuclear_name}: CPU (hand-crafted statistics, "
                             "scikit-image)")
    assert cnn.device.startswith("CPU")
