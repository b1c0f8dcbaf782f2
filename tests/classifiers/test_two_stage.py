"""Tests of the two-stage CNN backend: patch grids, dihedral transforms, networks, training,
the rotation ensemble, persistence and resume.

Networks are shrunk (64-pixel patches -> 8 x 8 maps, a few filters) and the synthetic images
are 192 x 256, i.e. BACH's 1536 x 2048 divided by 8: the same 5 x 7 = 35 training patches
and 3 x 4 = 12 image-wise patches per image.
"""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import numpy as np
import pandas as pd
import pytest

from classifiers.two_stage import grid as P
from classifiers.two_stage.model import (
    METHODS,
    TwoStageConfig,
    TwoStageInputError,
    TwoStageModel,
    build_image_network,
    build_patch_network,
    fuse_patch_probabilities,
)
from classifiers.two_stage.training import (
    CheckpointMismatchError,
    CheckpointStore,
    StageSpec,
    augmentation_plan,
    color_jitter,
    train_stage,
    validation_split,
)
from data.datasets import load_dataset
from data.io import write_image

TINY = dict(patch_size=64, stride=32, patch_width=4, image_width=8, dense_units=(16, 16, 8),
            epochs=2, image_epochs=3, batch_size=28, patch_copies=1, image_copies=2,
            val_fraction=0.25, patience=5, inference_batch_size=96, seed=0)
GATE = 1e-5  # float32 results of the same patches in different batch positions


# --- patch grids ----------------------------------------------------------------------------------


def test_grid_of_a_bach_image_at_both_strides():
    assert P.grid_shape(1536, 2048, 512, 256) == (5, 7)  # 35 overlapping patches
    assert P.grid_shape(1536, 2048, 512, 512) == (3, 4)  # 12 non-overlapping patches
    pos = P.patch_positions(1536, 2048, 512, 512)
    assert pos.shape == (12, 2)
    assert pos[:5].tolist() == [[0, 0], [0, 512], [0, 1024], [0, 1536], [512, 0]]
    assert pos[-1].tolist() == [1024, 1536]
    pos = P.patch_positions(1536, 2048, 512, 256)
    assert sorted(set(pos[:, 0])) == [0, 256, 512, 768, 1024]
    assert sorted(set(pos[:, 1])) == [0, 256, 512, 768, 1024, 1280, 1536]


def test_grid_of_odd_sizes_is_centred():
    # 1000 x 700: rows 1 + 488 // 256 = 2, cols 1 + 188 // 256 = 1; margins split evenly.
    assert P.grid_shape(1000, 700, 512, 256) == (2, 1)
    assert P.patch_positions(1000, 700, 512, 256).tolist() == [[116, 94], [372, 94]]
    # 1537 x 2049 at stride 512: still 3 x 4, one spare pixel goes to the bottom/right.
    assert P.patch_positions(1537, 2049, 512, 512)[0].tolist() == [0, 0]
    assert P.grid_shape(512, 513, 512, 512) == (1, 1)
    with pytest.raises(ValueError, match="511x600 pixels .* smaller than one 512x512 patch"):
        P.grid_shape(511, 600, 512, 256)


def test_extract_patches_cuts_the_positions():
    image = np.arange(70 * 90 * 3).reshape(70, 90, 3)
    grid = P.extract_patches(image, 32, 16)
    assert grid.shape == (3, 4, 32, 32, 3)
    y0, x0 = P.patch_positions(70, 90, 32, 16)[1 * 4 + 2]
    assert (y0, x0) == (19, 37)  # margins: 6 rows -> 3 above, 10 columns -> 5 left
    np.testing.assert_array_equal(grid[1, 2], image[19:51, 37:69])


# --- dihedral transforms --------------------------------------------------------------------------


def test_dihedral_transforms_are_the_eight_exact_pixel_permutations():
    a = np.arange(5 * 5 * 2).reshape(5, 5, 2)
    outs = [P.dihedral(a, t) for t in range(8)]
    for t, out in enumerate(outs):
        assert sorted(out.ravel().tolist()) == a.ravel().tolist()  # a permutation, no value made up
        np.testing.assert_array_equal(P.dihedral(out, P.inverse_dihedral(t)), a)
    assert len({out.tobytes() for out in outs}) == 8
    np.testing.assert_array_equal(outs[1], np.rot90(a))
    np.testing.assert_array_equal(outs[4], a[:, ::-1])
    np.testing.assert_array_equal(outs[5], np.transpose(a, (1, 0, 2)))
    np.testing.assert_array_equal(outs[6], a[::-1])
    np.testing.assert_array_equal(outs[7], np.transpose(a, (1, 0, 2))[::-1, ::-1])
    assert P.DIHEDRAL_NAMES[5] == "transpose" and P.DIHEDRAL_NAMES[7] == "anti_transpose"
    assert [P.swaps_axes(t) for t in range(8)] == [False, True] * 4
    with pytest.raises(ValueError, match="0..7"):
        P.dihedral(a, 8)


def test_transforming_the_grid_equals_transforming_the_image():
    image = np.random.default_rng(0).integers(0, 256, (2 * 16, 3 * 16, 3), dtype=np.uint8)
    grid = P.extract_patches(image, 16, 16)
    for t in range(8):
        np.testing.assert_array_equal(P.dihedral_grid(grid, t), P.extract_patches(P.dihedral(image, t), 16, 16))
    np.testing.assert_array_equal(P.transpose_grid(grid), P.extract_patches(image.transpose(1, 0, 2), 16, 16))


def test_stack_maps_orders_channels_by_patch_then_channel():
    grid = np.random.default_rng(1).normal(size=(3, 4, 8, 8, 2))
    stack = P.stack_maps(grid)
    assert stack.shape == (8, 8, 24)
    np.testing.assert_array_equal(stack[..., (1 * 4 + 2) * 2 + 1], grid[1, 2, :, :, 1])
    np.testing.assert_array_equal(P.orient_grid(P.transpose_grid(grid), (3, 4)), grid)
    assert P.orient_grid(grid, (3, 4)) is grid
    with pytest.raises(ValueError, match="3x4 patch grid cannot be oriented to 2x6"):
        P.orient_grid(grid, (2, 6))


# --- augmentation, split, fusion ------------------------------------------------------------------


def test_augmentation_plan_reproduces_the_papers_16_variants():
    transforms, jitter = augmentation_plan(16, np.random.default_rng(0), 5)
    for t, j in zip(transforms, jitter):
        assert sorted(t[~j].tolist()) == list(range(8)) and sorted(t[j].tolist()) == list(range(8))
    transforms, jitter = augmentation_plan(8, np.random.default_rng(0), 3)
    assert not jitter[:, :4].any() and jitter[:, 4:].all()


def test_color_jitter_changes_colour_within_range_and_zero_strength_is_identity():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    np.testing.assert_allclose(color_jitter(image, np.random.default_rng(1), 0.0), image, atol=1e-3)
    out = color_jitter(image, np.random.default_rng(1), 0.5)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
    assert np.abs(out - image).mean() > 1.0


def test_validation_split_keeps_patients_together_and_every_class_in_training():
    labels = np.repeat([0, 1, 2, 3], 6)
    groups = np.array([f"p{i // 2}" for i in range(24)])  # 3 patients per class
    train, val = validation_split(labels, groups, 0.2, seed=0)
    assert len(train) + len(val) == 24 and not set(groups[train]) & set(groups[val])
    assert sorted(set(labels[val])) == [0, 1, 2, 3] and len(val) == 8  # round(0.2 * 3) -> 1 patient each
    assert sorted(set(labels[train])) == [0, 1, 2, 3]
    train0, val0 = validation_split(labels, groups, 0.0, seed=0)
    assert len(train0) == 24 and len(val0) == 0


def test_patch_fusion_baselines():
    p = np.array([[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.1, 0.0, 0.9]])
    np.testing.assert_allclose(fuse_patch_probabilities(p, "majority"), [2 / 3, 0, 1 / 3])
    np.testing.assert_allclose(fuse_patch_probabilities(p, "max"), np.array([0.6, 0.4, 0.9]) / 1.9)
    np.testing.assert_allclose(fuse_patch_probabilities(p, "sum"), [1.3 / 3, 0.8 / 3, 0.9 / 3])


# --- networks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 4])
def test_patch_network_maps_a_512_patch_to_c_maps_of_64x64(channels):
    import keras

    cfg = TwoStageConfig(channels=channels, patch_width=2)  # 512 patches, few filters
    net = build_patch_network(cfg, 4)
    maps = keras.Model(net.input, net.get_layer("maps").output)
    patch = np.random.default_rng(0).uniform(0, 255, (1, 512, 512, 3)).astype(np.float32)
    assert tuple(maps(patch, training=False).shape) == (1, 64, 64, channels)
    convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 16
    assert [i + 1 for i, c in enumerate(convs) if c.strides == (2, 2)] == [3, 6, 9]
    assert [c.filters for c in convs] == [2] * 3 + [4] * 3 + [8] * 3 + [16] * 3 + [32] * 3 + [channels]
    assert not [layer for layer in net.layers if isinstance(layer, keras.layers.Dropout)]


def test_paper_default_networks_have_the_expected_size():
    cfg = TwoStageConfig()
    patch, image = build_patch_network(cfg, 4), build_image_network(cfg, 12, 4)
    # 7.8 MB and 1.6 MB of float32, as the paper's 7.9 MB and 1.6 MB (authors' flatten head).
    assert patch.count_params() == 1_959_157
    gap = build_patch_network(TwoStageConfig(patch_head="gap"), 4)
    assert gap.count_params() == 1_942_777
    assert image.count_params() == 407_237
    assert tuple(image.input.shape) == (None, 64, 64, 12)
    assert [layer.rate for layer in image.layers if layer.__class__.__name__ == "Dropout"] == [0.5] * 3


def test_a_few_training_steps_lower_the_loss(synthetic_dir):
    import keras

    keras.utils.set_random_seed(0)
    cfg = TwoStageConfig(**TINY)
    table = load_dataset(synthetic_dir)
    model = TwoStageModel(cfg)
    x, y = [], []
    for path, label in zip(table["path"], table["label"]):
        if label in ("normal", "invasive"):
            grid = P.extract_patches(model.load_image(path), 64, 64)
            x.append(grid.reshape(-1, 64, 64, 3)[:4])
            y += [0 if label == "normal" else 3] * 4
    x, y = np.concatenate(x).astype(np.float32), np.array(y)
    net = build_patch_network(cfg, 4)
    net.compile(optimizer=net.optimizer, loss=net.loss, metrics=["accuracy"], run_eagerly=True)  # no tracing
    losses = [float(net.train_on_batch(x, y)[0]) for _ in range(8)]
    assert losses[0] > 1.3 and losses[-1] < 0.5 * losses[0]


# --- the trained model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_table(synthetic_dir) -> pd.DataFrame:
    return load_dataset(synthetic_dir / "manifest.csv")  # 16 images, 8 patients


class _Interrupt:
    """on_epoch_end hook recording epochs and interrupting after a given one (like Ctrl-C)."""

    def __init__(self, stage=None, epoch=None):
        self.stop_at, self.seen = (stage, epoch), []

    def __call__(self, record):
        self.seen.append((record.stage, record.epoch, record.optimizer_steps))
        if (record.stage, record.epoch) == self.stop_at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def resumed(data_table, tmp_path_factory):
    """A model trained with an interruption (Ctrl-C) after patch-wise epoch 1, then resumed."""
    ckpt = tmp_path_factory.mktemp("checkpoints")
    first = _Interrupt("patch", 1)
    with pytest.raises(KeyboardInterrupt):
        TwoStageModel(TwoStageConfig(**TINY)).fit(data_table, checkpoint_dir=ckpt, on_epoch_end=first)
    interrupted = {"state": json.loads((ckpt / "state.json").read_text()),
                   "files": sorted(p.name for p in ckpt.iterdir()), "seen": first.seen}
    second = _Interrupt()
    model = TwoStageModel(TwoStageConfig(**TINY)).fit(data_table, checkpoint_dir=ckpt, on_epoch_end=second)
    return model, interrupted, second.seen, ckpt


@pytest.fixture(scope="module")
def fitted(resumed):
    return resumed[0]


def test_fit_trains_both_stages_and_reports_progress(fitted, data_table):
    model = fitted
    assert model.grid_ == (3, 4)
    assert model.classes_.tolist() == ["normal", "benign", "insitu", "invasive"]
    logs = model.history_["patch"] + model.history_["image"]
    assert [(r["stage"], r["epoch"]) for r in logs] == [("patch", 1), ("patch", 2), ("image", 1), ("image", 2),
                                                        ("image", 3)]
    # 8 training images x 35 patches x 1 copy = 280 patches = 10 batches of 28 per epoch.
    assert [r["optimizer_steps"] for r in logs[:2]] == [10, 20]
    assert all(r["val_accuracy"] is not None and np.isfinite(r["loss"]) for r in logs)
    assert len(model.history_["validation_ids"]) == 8  # one patient (2 images) per class
    val_patients = data_table.set_index("image_id").loc[model.history_["validation_ids"], "group"]
    assert val_patients.nunique() == 4


def test_predictions_of_all_methods_are_probabilities(fitted, data_table):
    model = fitted
    scores = model.predict_scores(data_table, METHODS, ensemble=False)
    for m in METHODS:
        assert scores[m].shape == (16, 4)
        np.testing.assert_allclose(scores[m].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scores["majority"] * 12, np.round(scores["majority"] * 12), atol=1e-9)
    assert set(model.predict(data_table, method="majority", ensemble=False)) <= set(model.classes_)


def _match(stacks_a, stacks_b) -> list[int]:
    """For each stack of `stacks_a`, the index of the equal stack of `stacks_b`."""
    return [next(j for j, b in enumerate(stacks_b) if np.allclose(a, b, atol=GATE)) for a in stacks_a]


def test_ensemble_is_invariant_to_quarter_turns_of_a_non_square_image(fitted, data_table):
    model = fitted
    image = model.load_image(data_table["path"][0])  # 192 x 256: a 3 x 4 grid
    stacks = model.view_stacks(image, range(8))
    # The 8 image-wise inputs are all different: 8 genuine ensemble members.
    assert len(set(_match(stacks, stacks))) == 8
    proba = model.predict_proba(image, ensemble=True)
    for t in (1, 4, 7):  # quarter-turned (portrait, 4 x 3 grid), mirrored, anti-transposed
        turned = np.ascontiguousarray(P.dihedral(image, t))
        # ... have the same 8 views, so the same ensemble prediction.
        assert sorted(_match(model.view_stacks(turned, range(8)), stacks)) == list(range(8))
        np.testing.assert_allclose(model.predict_proba(turned, ensemble=True), proba, atol=GATE)


def test_ensemble_of_a_rotation_invariant_input_equals_a_single_pass():
    model = TwoStageModel(TwoStageConfig(**TINY)).initialize(grid=(2, 2))
    base = np.random.default_rng(0).integers(0, 256, (128, 128, 3)).astype(np.int64)
    symmetric = (sum(P.dihedral(base, t) for t in range(8)) // 8).astype(np.uint8)
    np.testing.assert_array_equal(P.dihedral(symmetric, 1), symmetric)
    assert _match(model.view_stacks(symmetric, range(8)), model.view_stacks(symmetric, [0])) == [0] * 8
    for method in METHODS:
        np.testing.assert_allclose(model.predict_proba(symmetric, method, ensemble=True),
                                   model.predict_proba(symmetric, method, ensemble=False), atol=GATE)
    assert len(set(_match(model.view_stacks(base.astype(np.uint8), range(8)), model.view_stacks(base.astype(np.uint8),
                                                                                         range(8))))) == 8


def test_views_of_non_square_images_keep_the_trained_layout(monkeypatch):
    """With a rotation-equivariant stand-in for the patch-wise network (8 x 8 mean pooling),
    every view's stacked input must be a genuine rotation/flip of the unrotated input."""
    model = TwoStageModel(TwoStageConfig(**TINY)).initialize(grid=(2, 3))

    def pooled(patches):
        maps = patches.reshape(len(patches), 8, 8, 8, 8, 3).mean(axis=(2, 4))[..., :1]
        return maps, np.full((len(patches), 4), 0.25)

    monkeypatch.setattr(model, "patch_outputs", pooled)
    image = np.random.default_rng(0).integers(0, 256, (128, 192, 3)).astype(np.uint8)
    stacks = model.view_stacks(image, range(8))
    reference = pooled(P.extract_patches(image, 64, 64).reshape(-1, 64, 64, 3))[0].reshape(2, 3, 8, 8, 1)
    expected = {t: P.stack_maps(P.dihedral_grid(reference, t)) for t in (0, 2, 4, 6)}  # keep 2 x 3
    probe = np.arange(6).reshape(2, 3)
    for t, stack in enumerate(stacks):
        # A quarter-turned view is transposed back: it ends as a layout-preserving transform.
        view = P.dihedral(probe, t)
        view = view.T if view.shape != probe.shape else view
        ends_as = next(h for h in expected if np.array_equal(P.dihedral(probe, h), view))
        np.testing.assert_allclose(stack, expected[ends_as], err_msg=P.DIHEDRAL_NAMES[t])


def test_features_maps_and_bad_inputs(fitted, data_table, tmp_path):
    model = fitted
    path = data_table["path"][3]
    assert model.patch_maps(path).shape == (3, 4, 8, 8, 1)
    np.testing.assert_allclose(model.patch_maps(path, transform=1), model.patch_maps(path, transform=1))
    assert model.image_features(data_table.iloc[:2]).shape == (2, 8 * 8 * 12)
    assert model.image_features(path, pooling="patch_mean").shape == (1, 12)
    square = model.load_image(path)[:128, :128]
    assert model.image_features(square, pooling="mean").shape == (1, 1)
    with pytest.raises(TwoStageInputError, match="<array 0>.*2x2 grid .* takes 3x4 grids"):
        model.predict_proba(square)
    assert model.predict_proba(square, method="sum").shape == (1, 4)  # fusion takes any size
    small = write_image(tmp_path / "small.png", np.full((40, 80, 3), 200, np.uint8))
    with pytest.raises(TwoStageInputError, match="small.png' is 40x80 .* smaller than one 64x64 patch"):
        model.predict_proba(str(small))


def test_fit_rejects_mixed_grids_before_training(tmp_path):
    rng = np.random.default_rng(0)
    paths = [write_image(tmp_path / "a.png", rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)),
             write_image(tmp_path / "b.png", rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))]
    table = pd.DataFrame({"image_id": ["a.png", "b.png"], "path": [str(p) for p in paths],
                          "label": ["normal", "invasive"]})
    with pytest.raises(TwoStageInputError, match=r"3x4: 1 image\(s\), e.g. 'a.png'; 2x2: 1 image\(s\)"):
        TwoStageModel(TwoStageConfig(**TINY)).fit(table)


def test_save_load_round_trip(fitted, data_table, tmp_path):
    model = fitted
    model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "image_net.keras",
                                                                      "patch_net.keras"]
    with zipfile.ZipFile(tmp_path / "model" / "patch_net.keras") as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")))
        assert "optimizer" not in weights  # weights only: the training state stays in checkpoints
    record = json.loads((tmp_path / "model" / "config.json").read_text())
    assert record["grid"] == [3, 4] and record["config"]["patch_size"] == 64
    loaded = TwoStageModel.load(tmp_path / "model")
    assert loaded.cfg == model.cfg and loaded.grid_ == (3, 4)
    for method in ("two_stage", "sum"):
        np.testing.assert_allclose(loaded.predict_proba(data_table.iloc[:3], method),
                                   model.predict_proba(data_table.iloc[:3], method), atol=1e-6)


def test_cli_predict_writes_every_method(fitted, data_table, synthetic_dir, tmp_path):
    from pipeline.two_stage import main

    model = fitted
    model.save(tmp_path / "model")
    out = tmp_path / "pred.csv"
    code = main(["predict", "--model", str(tmp_path / "model"), str(synthetic_dir / "insitu"),
                 "--out", str(out), "--method", "all", "--no-ensemble"])
    assert code == 0
    table = pd.read_csv(out)
    assert len(table) == 4 and {"two_stage", "majority", "max", "sum", "sum:insitu"} <= set(table.columns)
    np.testing.assert_allclose(table[[f"two_stage:{c}" for c in model.classes_]].sum(axis=1), 1.0, rtol=1e-5)


# --- checkpoints and resume -----------------------------------------------------------------------


def test_training_resumes_after_interruption_from_the_last_finished_epoch(resumed):
    model, interrupted, seen, ckpt = resumed
    assert interrupted["seen"] == [("patch", 1, 10)]
    assert interrupted["state"]["stages"]["patch"]["epochs_done"] == 1
    assert interrupted["files"] == ["patch_net.e0001.keras", "state.json"]
    # The rerun started at epoch 2, and epoch 2 continued epoch 1's optimizer (steps 10 -> 20).
    assert seen == [("patch", 2, 20), ("image", 1, 1), ("image", 2, 2), ("image", 3, 3)]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["stages"]["patch"]["finished"] and state["stages"]["image"]["finished"]
    assert {p.name for p in ckpt.glob("*_net.e*.keras")} == {"patch_net.e0002.keras", "image_net.e0003.keras"}
    with pytest.raises(CheckpointMismatchError, match="another config or other training images"):
        CheckpointStore(ckpt, {"config": {**TINY, "seed": 1}})


def test_train_stage_resumes_early_stopping_and_lr_schedule(tmp_path):
    """The epoch loop alone, on a toy model with a scripted validation accuracy."""
    import keras

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1)
    scripted = [0.5, 0.6, 0.7, 0.65, 0.7, 0.6, 0.9, 0.9]  # best: epoch 3 (epoch 5 ties, higher loss)
    snapshots = {}

    def evaluate(model):
        epoch = int(model.optimizer.iterations.numpy()) // 4
        snapshots[epoch] = model.get_weights()
        return 1.0 + 0.01 * epoch, scripted[epoch - 1]

    def run(store, hook=None):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        spec = StageSpec("toy", epochs=8, learning_rate=0.05, decay=0.1, decay_every=2, patience=3)
        batches = lambda epoch: ((x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10))  # noqa: E731
        return train_stage(model, spec, batches, 4, evaluate, store, hook)

    model, history = run(CheckpointStore(tmp_path / "a", {"run": 1}))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]  # 3 epochs without progress after 3
    assert [h["learning_rate"] for h in history] == pytest.approx([0.05, 0.05, 5e-3, 5e-3, 5e-4, 5e-4])
    for got, best in zip(model.get_weights(), snapshots[3]):
        np.testing.assert_array_equal(got, best)

    with pytest.raises(KeyboardInterrupt):
        run(CheckpointStore(tmp_path / "b", {"run": 1}), _Interrupt("toy", 4))
    snapshots.clear()
    hook = _Interrupt()
    model_b, history_b = run(CheckpointStore(tmp_path / "b", {"run": 1}), hook)
    assert [s[:2] for s in hook.seen] == [("toy", 5), ("toy", 6)] and sorted(snapshots) == [5, 6]
    assert [h["loss"] for h in history_b] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    for got, want in zip(model_b.get_weights(), model.get_weights()):  # epoch 3's, from its checkpoint
        np.testing.assert_allclose(got, want, rtol=1e-6)


# --- the model protocol ---------------------------------------------------------------------------


def test_two_stage_model_speaks_the_protocol(fitted, synthetic_dir, tmp_path):
    from classifiers.protocol import Model, load_model
    from conftest import prediction_columns

    fitted.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert isinstance(loaded, TwoStageModel) and isinstance(loaded, Model) and loaded.kind == "two_stage"
    result = loaded.predict_images([synthetic_dir / "insitu", tmp_path / "missing.png"])
    assert list(result.table.columns) == prediction_columns(loaded.classes) and len(result.table) == 4
    assert (result.table["n_aug"] == 8).all() and result.n_images == 4
    assert [s["reason"] for s in result.skipped] == ["no such file or folder"]
    direct = fitted.predict_proba(sorted(str(p) for p in (synthetic_dir / "insitu").iterdir()))
    np.testing.assert_allclose(result.table[[f"proba_{c}" for c in loaded.classes]].to_numpy(dtype=float),
                               direct, atol=1e-5)
    with pytest.raises(ValueError, match="holds its own weights"):
        loaded.predict_images([synthetic_dir], weights={"resnet50": "w.h5"})
    maker = loaded.heatmaps()
    assert (maker.window, maker.step) == (64, 16) and maker.classes == loaded.classes
