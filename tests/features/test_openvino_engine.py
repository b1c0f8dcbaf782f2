"""Issue 16 item 6: the optional OpenVINO engine gives the Keras engine's features, keyed apart."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from features import openvino_engine
from features.extract import extract_in_memory, make_config, make_extractor

TINY = dict(backbone="efficientnet_lite0", weights=None, stain_reference="none", augmentations=3,
            crops=2, crop_size=48, scale=1.0)


@pytest.fixture
def ov_cache(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    cache = tmp_path / "ov-cache"
    monkeypatch.setenv(openvino_engine.CACHE_ENV, str(cache))
    return cache


def _cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("mode", ["shared", "exact"])
def test_openvino_features_match_keras_and_key_the_store_apart(tiny_dataset, ov_cache, mode):
    keras_config = make_config(tiny_dataset, mode=mode, batch_size=2, **TINY)
    ov_config = make_config(tiny_dataset, mode=mode, batch_size=2, engine="openvino", **TINY)
    assert "engine" not in keras_config.hashed_dict()  # stores made before keep their key
    assert ov_config.hashed_dict()["engine"] == "openvino"
    assert ov_config.config_hash != keras_config.config_hash

    expected, _ = extract_in_memory(tiny_dataset, keras_config)
    got, summary = extract_in_memory(tiny_dataset, ov_config)
    assert "OpenVINO" in summary.device and "f32" in summary.device
    assert got.X.shape == expected.X.shape == (3 * len(tiny_dataset), 1280)
    # Stated tolerance (float32, same random-init weights, seed 0): max abs difference within
    # 1e-4 of the largest feature, row cosine >= 0.99999.  Not bit for bit: other kernels.
    scale = np.abs(expected.X).max()
    assert scale > 0
    assert np.abs(got.X - expected.X).max() <= 1e-4 * scale
    assert _cosines(got.X.astype(np.float64), expected.X.astype(np.float64)).min() >= 0.99999


def test_converted_model_is_cached_and_read_without_keras(tiny_dataset, ov_cache):
    config = make_config(tiny_dataset, mode="shared", engine="openvino", **TINY)
    first = make_extractor(config)
    assert not first.cached
    entries = list(ov_cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "model.xml").is_file()
    assert not [p for p in ov_cache.iterdir() if p.name.startswith(".tmp-")]

    def no_keras():
        raise AssertionError("the cached model must be read, not converted again")

    again = openvino_engine.OpenVINOExtractor(config, build_keras=no_keras)
    assert again.cached and again.feature_dim == 1280
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    np.testing.assert_array_equal(again.feature_maps(images), first.feature_maps(images))
    # Crop-window means by OpenVINO's average pool equal the float64 summed-area table's
    # (features.feature_maps.pool_windows) within 1e-6 relative, whatever the map size.
    from features.feature_maps import pool_windows

    rng = np.random.default_rng(0)
    for (b, h, w), side in [((2, 24, 32), 750), ((3, 5, 7), 64), ((1, 2, 3), 64)]:
        maps = rng.random((b, h, w, 16), dtype=np.float32) * 6
        s = min(side, 32 * h, 32 * w)
        windows = np.stack([np.column_stack([rng.integers(0, 32 * h - s + 1, 5),
                                             rng.integers(0, 32 * w - s + 1, 5), np.full(5, s)])
                            for _ in range(b)])
        expected = np.stack([pool_windows(m, win, 32) for m, win in zip(maps, windows)])
        np.testing.assert_allclose(first.window_means(maps, windows), expected, rtol=1e-6, atol=0)
    # A damaged entry (here a truncated weights file) is converted again, never run.
    weights = entries[0] / "model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    rebuilt = openvino_engine.OpenVINOExtractor(config)
    assert not rebuilt.cached
    np.testing.assert_array_equal(rebuilt.feature_maps(images), first.feature_maps(images))
    # Another seed is another random network: another entry, never the cached one.
    other = make_config(tiny_dataset, mode="shared", engine="openvino", seed=1, **TINY)
    assert openvino_engine._key_name(openvino_engine.model_key(other)) != entries[0].name


def test_missing_openvino_is_a_clear_error_before_any_work(tiny_dataset, tiny_dir, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install openvino"):
        make_config(tiny_dataset, engine="openvino", **TINY)
    # On the command line: one error line naming the install command, status 2, no traceback.
    from pipeline import extract as cli

    args = ["--data", str(tiny_dir), "--out", str(tmp_path), "--weights", "none", "--engine", "openvino",
            "--stain-reference", "none"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error: the OpenVINO engine needs the openvino package: pip install openvino" in err
    assert "Traceback" not in err
    with pytest.raises(ValueError, match="engine must be one of keras, openvino"):
        make_config(tiny_dataset, engine="onnx", **TINY)


def test_extract_cli_engine_option_makes_an_openvino_store(tiny_dir, tmp_path, ov_cache, capsys):
    import json

    from pipeline import extract as cli

    out = tmp_path / "store"
    args = ["--data", str(tiny_dir), "--out", str(out), "--weights", "none", "--engine", "openvino",
            "--mode", "shared", "--augmentations", "1", "--crops", "2", "--crop-size", "48",
            "--scale", "1", "--stain-reference", "none", "--workers", "1", "--quiet"]
    assert cli.main(args) == 0
    assert "OpenVINO" in capsys.readouterr().out  # the summary names the engine that ran
    (store,) = [p for p in out.iterdir() if (p / "config.json").is_file()]
    assert json.loads((store / "config.json").read_text())["engine"] == "openvino"
