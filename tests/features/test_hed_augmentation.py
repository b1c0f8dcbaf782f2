"""The HED colour augmentation (``--color-augmentation hed``, Tellez et al. 2019)."""
import json
from dataclasses import replace

import numpy as np
import pytest

from data.synthetic import make_image
from features.augment import (ColorAugmentation, HEDAugmentation, RGB_FROM_HED, apply_hed_graph,
                              draw_augmentation)
from features.config import ExtractionConfig
from features.extract import extract_in_memory, make_config
from features.store import load_store
from pipeline import extract as cli


def _tissue(seed=0, size=(96, 128)):
    return make_image("invasive", np.random.default_rng(seed), size=size)


def _every_level():
    image = np.random.default_rng(0).integers(0, 256, (8, 256, 3), dtype=np.uint8)
    image[0] = np.arange(256)[:, None]  # every grey level, including 0 and 255
    return image


def test_identity_draw_and_sigma_zero_keep_the_image():
    image = _every_level()
    hed = HEDAugmentation(0.05)
    np.testing.assert_array_equal(hed.apply(image, *hed.identity()), image)
    np.testing.assert_array_equal(hed.table(*hed.identity())[:3], np.eye(3, dtype=np.float32))
    draw0 = draw_augmentation(seed=0, image_id="a", aug_index=0, height=8, width=256, n_crops=0,
                              crop_size=16, color=hed)
    np.testing.assert_array_equal(hed.apply_table(image, draw0.table()), image)
    for aug in (1, 2, 3):  # sigma 0: every augmentation is the identity
        draw = draw_augmentation(seed=0, image_id="a", aug_index=aug, height=8, width=256, n_crops=0,
                                 crop_size=16, color=HEDAugmentation(0.0))
        np.testing.assert_array_equal(HEDAugmentation.apply_table(image, draw.table()), image)
    # HED-light is mild: on tissue, augmentation 1 moves pixels by 2 levels on average.
    tissue = _tissue()
    changed = hed.apply_table(tissue, draw_augmentation(
        seed=0, image_id="a", aug_index=1, height=96, width=128, n_crops=0, crop_size=16, color=hed).table())
    assert np.abs(changed.astype(int) - tissue).mean() == pytest.approx(1.98, abs=0.01)


def test_alpha_on_haematoxylin_moves_the_haematoxylin_channel():
    # Checked with scikit-image's own colour deconvolution: its concentrations are ours divided by
    # -ln(1e-6) and clipped at 0, so a gain of 1.3 on H scales its H by 1.3 and leaves E and DAB.
    rgb2hed = pytest.importorskip("skimage.color").rgb2hed  # in the test extra

    image = _tissue()
    before = rgb2hed(image)
    after = rgb2hed(HEDAugmentation().apply(image, np.array([1.3, 1.0, 1.0]), np.zeros(3)))
    change = np.abs(after - before).mean(axis=(0, 1))
    assert change[0] > 20 * max(change[1], change[2])
    stained = (before[..., 0] > 0.02) & (before > 0).all(-1) & (after > 0).all(-1)
    assert stained.mean() > 0.2
    ratio = after[..., 0][stained].sum() / before[..., 0][stained].sum()
    assert ratio == pytest.approx(1.3, abs=0.03)
    # A shift of the eosin concentration by 0.1 OD: skimage's E rises by 0.1 / -ln(1e-6).
    shifted = rgb2hed(HEDAugmentation().apply(image, np.ones(3), np.array([0.0, 0.1, 0.0])))
    rise = (shifted - before)[(before > 0).all(-1) & (shifted > 0).all(-1)].mean(axis=0)
    assert rise[1] == pytest.approx(0.1 / -np.log(1e-6), rel=0.15)
    assert abs(rise[0]) < 0.2 * rise[1] and abs(rise[2]) < 0.2 * rise[1]


def test_table_is_the_deconvolution_round_trip():
    alpha, beta = np.array([0.95, 1.04, 1.01]), np.array([0.02, -0.03, 0.01])
    table = HEDAugmentation.table(alpha, beta).astype(np.float64)
    od = np.random.default_rng(1).random((50, 3)) * 2
    stains = od @ np.linalg.inv(RGB_FROM_HED)
    np.testing.assert_allclose(od @ table[:3] + table[3], (stains * alpha + beta) @ RGB_FROM_HED,
                               rtol=1e-6, atol=1e-6)


def test_draws_are_deterministic_and_crop_like_the_rgb_augmentation():
    kw = dict(seed=3, image_id="benign/b1.tif", height=300, width=400, n_crops=5, crop_size=64)
    a = draw_augmentation(aug_index=2, color=HEDAugmentation(), **kw)
    b = draw_augmentation(aug_index=2, color=HEDAugmentation(), **kw)
    np.testing.assert_array_equal(a.table(), b.table())
    assert a.table().shape == (4, 3) and a.table().dtype == np.float32
    assert 0.95 <= a.gain.min() and a.gain.max() <= 1.05 and np.abs(a.shift).max() <= 0.05
    assert not np.array_equal(a.table(), draw_augmentation(aug_index=3, color=HEDAugmentation(), **kw).table())
    assert not np.array_equal(a.table(), draw_augmentation(**{**kw, "seed": 4}, aug_index=2,
                                                           color=HEDAugmentation()).table())
    # Six numbers drawn before the windows in both augmentations: the same crops.
    rgb = draw_augmentation(aug_index=2, color=ColorAugmentation(), **kw)
    np.testing.assert_array_equal(a.windows, rgb.windows)


def test_graph_equals_the_host():
    image = _tissue(1, (40, 56))
    hed = HEDAugmentation(0.2)
    tables = np.stack([hed.table(*hed.sample(np.random.default_rng(s))) for s in range(3)])
    host = np.stack([hed.apply_table(image, t) for t in tables])
    one = apply_hed_graph(image, tables, per_image=False).numpy()
    each = apply_hed_graph(np.stack([image] * 3).astype(np.int32), tables, per_image=True).numpy()
    assert one.dtype == np.float32 and one.shape == (3, 40, 56, 3)
    for got in (one, each):
        # float32 both; exp may differ in its last bit: at most one level, on rare pixels.
        assert np.abs(got - host).max() <= 1 and np.mean(got != host) < 1e-3


def test_config_key_of_existing_stores_is_unchanged():
    # The key every store made before the option has (default config); hed enters the key.
    assert ExtractionConfig().config_hash == "fa7397bba330da73bbacd31f7d80cfd422295c9c0199c93d5ff1b642a6fdb94e"
    old = {k: v for k, v in ExtractionConfig().to_dict().items()
           if k not in ("color_augmentation", "hed_sigma")}
    assert ExtractionConfig.from_dict(old).config_hash == ExtractionConfig().config_hash
    hed = ExtractionConfig(color_augmentation="hed")
    assert hed.hashed_dict()["color_augmentation"] == "hed" and "hed_sigma" not in hed.hashed_dict()
    assert hed.config_hash != ExtractionConfig().config_hash
    assert replace(hed, hed_sigma=0.2).config_hash != hed.config_hash
    for bad, message in [({"color_augmentation": "lab"}, "color_augmentation must be one of rgb, hed"),
                         ({"hed_sigma": 0.2}, "hed_sigma applies to color_augmentation 'hed'"),
                         ({"color_augmentation": "hed", "color_gain": 0.2}, "apply to color_augmentation 'rgb'"),
                         ({"color_augmentation": "hed", "hed_sigma": 1.5}, r"hed_sigma must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            ExtractionConfig(**bad)


def test_cli_hed_store_records_the_option_and_keeps_augmentation_zero(tiny_dir, tmp_path, capsys, monkeypatch):
    common = ["--data", str(tiny_dir), "--weights", "none", "--mode", "whole", "--augmentations", "2",
              "--scale", "1.0", "--stain-reference", "none", "--batch-size", "2", "--quiet", "--workers", "1"]
    assert cli.main(common + ["--out", str(tmp_path / "rgb")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "hed"), "--color-augmentation", "hed",
                              "--hed-sigma", "0.1"]) == 0
    assert "--color-augmentation" in cli.build_parser().format_help()
    (hed_store,) = (tmp_path / "hed").glob("efficientnet_lite0-*")
    record = json.loads((hed_store / "config.json").read_text())
    assert record["color_augmentation"] == "hed" and record["hed_sigma"] == 0.1
    rgb, hed = load_store(tmp_path / "rgb"), load_store(tmp_path / "hed")
    assert rgb.config["color_augmentation"] == "rgb" and rgb.config["config_hash"] != record["config_hash"]
    assert hed.X.shape == rgb.X.shape == (16, 1280)
    first = (hed.meta["aug"] == 0).to_numpy()
    np.testing.assert_array_equal(hed.meta["image_id"], rgb.meta["image_id"])
    np.testing.assert_array_equal(hed.X[first], rgb.X[first])  # the identity in both
    # Random-init features are tiny (about 1e-12): compare relative to their scale.
    assert np.abs(hed.X[~first] - rgb.X[~first]).max() > 1e-2 * np.abs(rgb.X).max()

    # A model trained on the HED store predicts with its config: the same HED augmentations.
    from classifiers.feature.model_io import load_model
    from classifiers.feature.predict import predict_images, reproducible_configs
    from pipeline import train as train_cli

    model_dir = tmp_path / "model"
    assert train_cli.main(["--features", str(hed_store), "--out", str(model_dir), "--classifier", "logreg"]) == 0
    model = load_model(model_dir)
    assert reproducible_configs(model)[0].color_augmentation == "hed"
    monkeypatch.chdir(tiny_dir)
    ids = list(dict.fromkeys(hed.meta["image_id"]))
    result = predict_images(model, ids)
    rows = np.concatenate([np.flatnonzero(hed.meta["image_id"].to_numpy() == i) for i in ids])
    np.testing.assert_allclose(result.row_proba, model.fitted.predict_proba([hed.X[rows]]), rtol=0, atol=1e-6)
    assert np.abs(result.row_proba - model.fitted.predict_proba([rgb.X[rows]])).max() > 1e-3  # not rgb's


@pytest.mark.parametrize("mode", ["exact", "shared"])
def test_openvino_engine_augments_as_the_keras_graph(tiny_dataset, tmp_path, monkeypatch, mode):
    pytest.importorskip("openvino")
    from features import openvino_engine

    monkeypatch.setenv(openvino_engine.CACHE_ENV, str(tmp_path / "ov-cache"))
    options = dict(backbone="efficientnet_lite0", weights=None, stain_reference="none", augmentations=3,
                   crops=2, crop_size=48, scale=1.0, mode=mode, batch_size=2, color_augmentation="hed",
                   hed_sigma=0.2)
    keras, _ = extract_in_memory(tiny_dataset, make_config(tiny_dataset, **options))
    ov, _ = extract_in_memory(tiny_dataset, make_config(tiny_dataset, engine="openvino", **options))
    rgb, _ = extract_in_memory(tiny_dataset, make_config(tiny_dataset, **{**options, "color_augmentation": "rgb",
                                                                           "hed_sigma": 0.05}))
    scale = np.abs(keras.X).max()
    assert np.abs(ov.X - keras.X).max() <= 1e-4 * scale  # the engines' stated tolerance
    later = (keras.meta["aug"] > 0).to_numpy()
    np.testing.assert_array_equal(keras.X[~later], rgb.X[~later])
    assert np.abs(keras.X[later] - rgb.X[later]).max() > 1e-2 * scale


def test_methods_text_names_the_augmentation_the_store_used():
    from classifiers.evaluation.methods import _colour_words

    rgb = {"color_gain": 0.1, "color_shift": 20.0}  # a store from before the option: rgb
    assert _colour_words(rgb) == ("an affine transform of each RGB channel's intensities, contrast gain "
                                  "drawn from 1 ± 0.1 around mid-grey and shift from ± 20.0 levels")
    hed = _colour_words({**rgb, "color_augmentation": "hed", "hed_sigma": 0.05})
    assert "haematoxylin, eosin and DAB" in hed and "1 ± 0.05" in hed and "Tellez" in hed
