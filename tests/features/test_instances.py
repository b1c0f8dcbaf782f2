"""Instance stores (issue 15): the cells of the whole image's feature map kept per augmentation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from features.config import ExtractionConfig
from features.extract import extract_in_memory, extract_to_store, make_config
from features.feature_maps import cell_edges, cell_means, cell_means_graph
from features.pooling import grid_shape, mean_of_instances, parse_instances
from features.store import FeatureStore, StoreError, load_store, make_record

# 64x80 images at scale 1: a 2x3 map of stride 32, so a 2x2 grid has cells of 1 and 2 columns.
TINY_WHOLE = dict(backbone="efficientnet_lite0", weights=None, stain_reference="none", augmentations=2,
                  scale=1.0, mode="whole")


def test_instances_option_is_parsed_and_checked():
    assert parse_instances("none") is None
    assert parse_instances("cells-4x3") == (4, 3)
    assert grid_shape("cells-4x3", 24, 32) == (3, 4)  # landscape: 4 along the width
    assert grid_shape("cells-4x3", 32, 24) == (4, 3)  # portrait: 4 along the height
    for bad in ("cells-0x3", "cells-4", "grid-4x3", "4x3"):
        with pytest.raises(ValueError, match="cells-AxB"):
            ExtractionConfig(mode="whole", crops=1, crop_size=0, instances=bad)
    with pytest.raises(ValueError, match="needs `mode=whole`"):
        ExtractionConfig(instances="cells-4x3")


def test_instances_change_the_store_key_and_the_default_keeps_old_keys():
    plain = ExtractionConfig(mode="whole", crops=1, crop_size=0)
    cells = ExtractionConfig(mode="whole", crops=1, crop_size=0, instances="cells-4x3")
    assert "instances" not in plain.hashed_dict()  # stores made before the field keep their key
    assert cells.hashed_dict()["instances"] == "cells-4x3"
    assert cells.store_name != plain.store_name
    assert "cells-4x3 instances" in cells.sampling


def test_cell_means_match_numpy_and_average_to_the_whole_map():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 7, 10, 5)).astype(np.float32)
    got = np.asarray(cell_means_graph(maps, "cells-4x3"))
    assert got.shape == (2, 12, 5)
    ys, xs = cell_edges(3, 7), cell_edges(4, 10)
    assert ys == [0, 2, 5, 7] and xs == [0, 2, 5, 8, 10]  # round(i * size / n), half to even
    want = np.stack([maps[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]].mean(axis=(1, 2))
                     for r in range(3) for c in range(4)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(cell_means(maps, "cells-4x3"), got, rtol=1e-6)  # the host's (OpenVINO engine)
    even = rng.random((1, 6, 8, 3))  # a grid that divides the map: the cells' mean is the map's
    np.testing.assert_allclose(mean_of_instances(np.asarray(cell_means_graph(even, "cells-4x3")))[0],
                               even.mean(axis=(1, 2))[0], rtol=1e-6)
    for means in (cell_means_graph, cell_means):
        with pytest.raises(ValueError, match="fewer cells"):
            means(maps, "cells-12x3")


def test_instance_store_keeps_the_cells_and_their_mean(tiny_dataset, tmp_path):
    plain = make_config(tiny_dataset, **TINY_WHOLE)
    cells = make_config(tiny_dataset, instances="cells-2x2", **TINY_WHOLE)
    extract_to_store(tiny_dataset, plain, tmp_path, progress=False)
    summary = extract_to_store(tiny_dataset, cells, tmp_path, progress=False)
    assert summary.skipped == [] and len(summary.done) == 8
    old, new = load_store(tmp_path / plain.store_name), load_store(summary.store_path)
    assert old.instances is None
    assert new.instances.shape == (16, 4, 1280) and new.X.shape == (16, 1280)
    np.testing.assert_array_equal(new.X, mean_of_instances(new.instances))
    # Same draws and network: the cells' mean is the plain store's vector, up to the unequal
    # cells (1 and 2 map columns) that weigh a column twice as much as the whole-map mean does.
    assert new.meta["image_id"].tolist() == old.meta["image_id"].tolist()
    assert np.abs(new.X - old.X).max() < 0.2 * np.abs(old.X).max()
    assert not np.array_equal(new.X, old.X)
    memory, _ = extract_in_memory(tiny_dataset, cells)  # predict's path gives the store's numbers
    np.testing.assert_array_equal(memory.instances, new.instances)
    np.testing.assert_array_equal(memory.X, new.X)
    assert new.rows(np.arange(4)).instances.shape == (4, 4, 1280)


def test_image_too_small_for_the_grid_is_skipped_with_the_reason(tiny_dataset, tmp_path):
    config = make_config(tiny_dataset, instances="cells-4x3", **TINY_WHOLE)
    summary = extract_to_store(tiny_dataset.iloc[:1], config, tmp_path, progress=False)
    assert summary.done == [] and len(summary.skipped) == 1
    assert "fewer than the 4x3 grid of instances cells-4x3" in summary.skipped[0]["reason"]


def _record(i, **extra):
    return make_record(image_id=f"normal/{i}.png", label="normal", group=f"g{i}", path=f"/d/{i}.png",
                       source_sha256="0" * 64, stain_note=None, **extra)


def test_store_written_before_instances_existed_reads_as_before(tmp_path):
    config = ExtractionConfig(weights="none", augmentations=2)
    with FeatureStore(tmp_path, config).open() as store:
        store.write(_record(0, features=np.ones((2, 3))))
    record = json.loads((store.path / "config.json").read_text())
    del record["instances"]  # as an older version wrote it
    (store.path / "config.json").write_text(json.dumps(record))
    table = load_store(store.path)
    assert table.instances is None and table.X.tolist() == [[1.0] * 3] * 2


def test_instance_store_with_a_record_lacking_instances_is_refused(tmp_path):
    config = ExtractionConfig(weights="none", augmentations=2, mode="whole", crops=1, crop_size=0,
                              instances="cells-2x1")
    with FeatureStore(tmp_path, config).open() as store:
        record = _record(0, features=np.arange(12.0).reshape(2, 2, 3))
        assert record["instances"].shape == (2, 2, 3)
        assert record["features"].tolist() == [[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]
        store.write(record)
        store.write(_record(1, features=np.ones((2, 3))))
    with pytest.raises(StoreError, match=r"instance store \(cells-2x1\) but the records of 1 image"):
        load_store(store.path)


def test_openvino_engine_gives_the_keras_instances(tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from features import openvino_engine

    monkeypatch.setenv(openvino_engine.CACHE_ENV, str(tmp_path / "ov-cache"))
    keras_config = make_config(tiny_dataset.iloc[:2], instances="cells-2x2", **TINY_WHOLE)
    ov_config = make_config(tiny_dataset.iloc[:2], instances="cells-2x2", engine="openvino", **TINY_WHOLE)
    expected, _ = extract_in_memory(tiny_dataset.iloc[:2], keras_config)
    got, _ = extract_in_memory(tiny_dataset.iloc[:2], ov_config)
    assert got.instances.shape == expected.instances.shape == (4, 4, 1280)
    # The engines' stated tolerance (tests/features/test_openvino_engine.py): 1e-4 of the largest.
    assert np.abs(got.instances - expected.instances).max() <= 1e-4 * np.abs(expected.instances).max()


def test_extract_command_line_names_its_options_in_errors(tiny_dir, tmp_path, capsys):
    from pipeline.extract import main

    common = ["--data", str(tiny_dir), "--out", str(tmp_path / "out"), "--weights", "none",
              "--stain-reference", "none"]
    for extra, message in ((["--instances", "cells-4x3"], "--instances cells-4x3 needs --mode whole"),
                           (["--mode", "whole", "--instances", "grid"], "--instances must be 'none' or 'cells-AxB'")):
        assert main(common + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.joblib"))


def test_a_model_trained_on_an_instance_store_predicts_new_images_from_the_cells_mean(tiny_dataset, tiny_dir, tmp_path,
                                                                                      monkeypatch):
    """What reads one vector per augmentation (train, predict) gets the mean of the cells."""
    from classifiers import predict_images, train

    config = make_config(tiny_dataset, instances="cells-2x2", **TINY_WHOLE)
    summary = extract_to_store(tiny_dataset, config, tmp_path / "features", progress=False)
    store = load_store(summary.store_path)
    model = train([store], tmp_path / "model", classifier="logreg")
    first = store.meta["image_id"] == store.meta["image_id"].iloc[0]
    monkeypatch.chdir(tiny_dir)  # the image id (which seeds its augmentations) is its path from here
    result = predict_images(tmp_path / "model", [store.meta["image_id"].iloc[0]])
    # predict extracts the cells again with the store's config and reads their mean: the stored
    # vectors, hence the stored rows' probabilities.
    expected = model._fitted().fitted.predict_proba([store.X[first.to_numpy()]])
    assert result.row_proba.shape == (2, 4)
    np.testing.assert_allclose(result.row_proba, expected, rtol=0, atol=1e-6)
