"""The patch ConvNet: architecture, point annotations, patch sampling, split, training, heatmap, CLI."""
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from classifiers.patch_cnn.annotations import (
    AnnotationError,
    NoAnnotationsError,
    PatchSampling,
    canonical_class,
    parse_annotations,
    read_annotations,
    sample_patches,
    synthetic_annotated_image,
    write_synthetic_annotated,
)
from classifiers.heatmaps import sliding_window_heatmap
from classifiers.patch_cnn.model import (
    PatchCNN,
    PatchCNNConfig,
    PatchDataset,
    build_patch_cnn,
    split_by_image,
    train_patch_cnn,
)
from data.io import write_image
from data.synthetic import make_image
from pipeline import heatmap as heatmap_cli
from pipeline import patch_cnn as patch_cli

SIZE = (128, 160)


# ---------------------------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------------------------


def test_architecture_matches_the_paper_table_and_its_171105_parameters():
    net = build_patch_cnn()
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in net.layers}
    assert shapes["conv1"] == (30, 30, 32) and shapes["pool1"] == (15, 15, 32)
    assert shapes["conv2"] == (14, 14, 32) and shapes["pool2"] == (14, 14, 32)
    assert shapes["conv3"] == (12, 12, 64) and shapes["pool3"] == (6, 6, 64)
    assert shapes["flatten"] == (2304,) and shapes["dense"] == (64,) and shapes["tumour"] == (1,)
    params = {layer.name: layer.count_params() for layer in net.layers}
    assert (params["conv1"], params["conv2"], params["conv3"], params["dense"], params["tumour"]) == \
        (896, 4128, 18496, 147520, 65)
    assert net.count_params() == 171_105


# ---------------------------------------------------------------------------------------------
# annotations
# ---------------------------------------------------------------------------------------------


def test_class_names_are_matched_loosely():
    assert canonical_class("Tumor") == "tumour" and canonical_class("non-tumor") == "non_tumour"
    assert canonical_class("Non Tumour") == "non_tumour" and canonical_class("non_tubule") == "non_tubule"
    assert canonical_class("lymphocyte") is None


def test_normalised_coordinates_are_detected_and_scaled_by_the_image_size():
    notes = parse_annotations({"tumor": [{"x": 0.5, "y": 0.25}, {"x": 1.0, "y": 0.0}], "mitosis": []},
                              height=100, width=200)
    assert notes.convention == "normalised"
    np.testing.assert_allclose(notes.points["tumour"][0], [25.0, 100.0])  # (y, x) pixels
    assert notes.points["tumour"][1][1] < 200  # x == width is the last pixel column
    assert notes.counts["mitosis"] == 0 and notes.counts["non_tumour"] == 0


def test_pixel_coordinates_are_detected_as_lists_or_dicts():
    notes = parse_annotations({"tumour": [[150, 20]], "Non-Tumor": [{"x": 3, "y": 90.5}]}, height=100, width=200)
    assert notes.convention == "pixels"
    np.testing.assert_allclose(notes.points["tumour"][0], [20, 150])
    np.testing.assert_allclose(notes.points["non_tumour"][0], [90.5, 3])


def test_points_outside_the_image_are_an_error_or_dropped():
    record = {"tumor": [[150, 20], [250, 20], [10, -1]]}
    with pytest.raises(AnnotationError, match=r"2 tumour point\(s\) outside the 200x100 image"):
        parse_annotations(record, height=100, width=200, source="a.json")
    notes = parse_annotations(record, height=100, width=200, outside="drop")
    assert notes.counts["tumour"] == 1 and [d["x"] for d in notes.dropped] == [250.0, 10.0]
    with pytest.raises(AnnotationError, match="outside"):
        parse_annotations({"tumor": [{"x": 0.5, "y": 1.5}]}, 100, 200, convention="normalised")


def test_mostly_normalised_file_with_stray_points_is_ambiguous():
    record = {"tumor": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.5], [12.0, 0.5]]}
    with pytest.raises(AnnotationError, match="3 of 4 points are in"):
        parse_annotations(record, 100, 200, source="b.json")
    forced = parse_annotations(record, 100, 200, convention="normalised", outside="drop")
    assert forced.counts["tumour"] == 3


@pytest.mark.parametrize("record,message", [
    ({"lymphocyte": []}, "unknown object class 'lymphocyte'"),
    ({"tumor": [{"x": "a", "y": 1}]}, "non-numeric"),
    ({"tumor": [{"x": float("nan"), "y": 1}]}, "non-finite"),
    ({"tumor": [[1, 2, 3]]}, "expected"),
    ({"tumor": {"x": 1, "y": 2}}, "must map to a list"),
    ([{"x": 1, "y": 2}], "expected a JSON object"),
])
def test_malformed_annotations_are_clear_errors(record, message):
    with pytest.raises(AnnotationError, match=message):
        parse_annotations(record, 100, 200, source="c.json")


def test_annotation_files_and_empty_annotations(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_annotations(tmp_path / "bad.json", 10, 10)
    with pytest.raises(AnnotationError, match="no such annotation file"):
        read_annotations(tmp_path / "missing.json", 10, 10)
    (tmp_path / "empty.json").write_text('{"tumor": [], "non_tumor": []}')
    empty = read_annotations(tmp_path / "empty.json", 64, 64)
    assert empty.n_points == 0
    with pytest.raises(NoAnnotationsError, match="no annotated object"):
        sample_patches(np.zeros((64, 64, 3), np.uint8), empty, PatchSampling(), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# patches and split
# ---------------------------------------------------------------------------------------------


def test_tumour_patches_contain_their_point_and_negatives_contain_none():
    image = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    record = {"tumor": [[0, 0], [119.5, 99.5], [60, 50], [5, 90]], "mitosis": [[100, 10]],
              "non_tumor": [[30, 30]]}
    notes = parse_annotations(record, 100, 120)
    sampling = PatchSampling(jitter=8, margin=4, min_negatives=20)
    patches, labels, positions = sample_patches(image, notes, sampling, np.random.default_rng(1))
    assert labels.tolist() == [1] * 4 + [0] * 20 and patches.shape == (24, 32, 32, 3)
    for (y, x), (py, px) in zip(positions[:4], notes.points["tumour"]):
        assert 0 <= y <= 100 - 32 and 0 <= x <= 120 - 32
        assert y <= py < y + 32 and x <= px < x + 32
    everything = notes.all_points()
    for y, x in positions[4:]:
        near = ((everything[:, 0] >= y - 4) & (everything[:, 0] < y + 36)
                & (everything[:, 1] >= x - 4) & (everything[:, 1] < x + 36))
        assert not near.any()
    np.testing.assert_array_equal(patches[5], image[positions[5][0]:positions[5][0] + 32,
                                                     positions[5][1]:positions[5][1] + 32])
    again = sample_patches(image, notes, sampling, np.random.default_rng(1))
    np.testing.assert_array_equal(again[2], positions)  # seeded


def test_split_is_by_image_seeded_and_70_15_15():
    ids = [f"img{i}" for i in range(20)]
    split = split_by_image(ids, 0.15, 0.15, seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [14, 3, 3]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(ids)
    assert split == split_by_image(list(reversed(ids)), 0.15, 0.15, seed=0)
    assert split != split_by_image(ids, 0.15, 0.15, seed=1)
    assert split_by_image(["a"], 0.15, 0.15, 0) == {"train": ["a"], "val": [], "test": []}


# ---------------------------------------------------------------------------------------------
# training and heatmap
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """The ConvNet after 10 epochs on patches of 8 synthetic images with an invasive box."""
    blocks = []
    for i in range(8):
        rng = np.random.default_rng([0, i])
        image, record, _ = synthetic_annotated_image(rng, SIZE, points_per_kpx=10)
        notes = parse_annotations(record, *SIZE, source=f"synth_{i}")
        patches, labels, _ = sample_patches(image, notes, PatchSampling(), rng)
        blocks.append((patches, labels, np.full(len(labels), f"synth_{i}", dtype=object)))
    dataset = PatchDataset(*(np.concatenate([b[k] for b in blocks]) for k in range(3)))
    return train_patch_cnn(dataset, PatchCNNConfig(epochs=10, seed=0))


def test_training_splits_by_image_and_learns(trained):
    split, metrics = trained.record["split"], trained.record["metrics"]
    assert [len(split[k]) for k in ("train", "val", "test")] == [6, 1, 1]
    assert not set(split["train"]) & (set(split["val"]) | set(split["test"]))
    assert sum(m["patches"] for m in metrics.values()) > 800
    assert metrics["train"]["accuracy"] > 0.75 and len(trained.record["history"]["loss"]) == 10


def test_patch_heatmap_with_step_8_is_higher_inside_the_tumour_region(trained):
    box = (32, 48, 96, 112)
    image = make_image("normal", np.random.default_rng([1, 99]), SIZE, tumour_region=box)
    hm = sliding_window_heatmap(image, trained.predict_proba, trained.classes, window=32, step=8)
    assert hm.grid.shape == (13, 17)
    tumour = hm.to_image()[..., hm.class_index("tumour")]
    inside = np.zeros(SIZE, bool)
    inside[box[0]:box[2], box[1]:box[3]] = True
    assert tumour[inside].mean() - tumour[~inside].mean() > 0.3


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "m")
    loaded = PatchCNN.load(tmp_path / "m")
    patches = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict_proba(patches), trained.predict_proba(patches), atol=1e-6)
    assert loaded.config == trained.config and loaded.record["split"] == trained.record["split"]
    with pytest.raises(ValueError, match=r"\(n, 32, 32, 3\)"):
        loaded.predict_proba(np.zeros((2, 64, 64, 3)))
    with pytest.raises(FileNotFoundError, match="not a patch ConvNet"):
        PatchCNN.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_trains_lists_skips_and_makes_a_heatmap(tmp_path, capsys):
    data = write_synthetic_annotated(tmp_path / "data", n_images=4, size=(96, 128), seed=0)
    write_image(data / "images" / "unannotated.png", np.full((96, 128, 3), 200, np.uint8))
    write_image(data / "images" / "empty.png", np.full((96, 128, 3), 200, np.uint8))
    (data / "groundTruth" / "empty.json").write_text("{}")
    out = tmp_path / "model"
    argv = ["train", "--images", str(data / "images"), "--annotations", str(data / "groundTruth"),
            "--out", str(out), "--epochs", "1", "--quiet"]
    assert patch_cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "171,105 parameters" in text and "coordinates read as normalised: 4 files" in text
    assert "unannotated.png: no annotation file" in text and "empty.png" in text and "no annotated object" in text
    assert patch_cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err

    maps = tmp_path / "maps"
    image = data / "images" / "synth_0.png"
    assert heatmap_cli.main(["--model", str(out), str(image), "--out", str(maps)]) == 0
    record = json.loads((maps / "synth_0.heatmap.json").read_text())
    assert record["grid"]["side"] == 32 and record["grid"]["step"] == 8
    assert record["classes"] == ["non-tumour", "tumour"]
    assert np.load(maps / "synth_0.tumour.npy").shape == (9, 13)
    assert heatmap_cli.main(["--model", str(out), str(image), "--window", "64", "--out", str(maps)]) == 2
    assert "32-pixel windows only" in capsys.readouterr().err


def test_cli_stops_on_invalid_annotation_files_listing_all(tmp_path, capsys):
    data = write_synthetic_annotated(tmp_path / "data", n_images=3, size=(64, 64), seed=0)
    (data / "groundTruth" / "synth_0.json").write_text('{"tumor": [[10, 10]], "lymphocyte": []}')
    (data / "groundTruth" / "synth_1.json").write_text('{"tumor": [[10, 10], [500, 10]]}')
    argv = ["train", "--images", str(data / "images"), "--annotations", str(data / "groundTruth"),
            "--out", str(tmp_path / "m"), "--epochs", "1"]
    assert patch_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "2 invalid annotation file(s)" in err and "lymphocyte" in err and "outside the 64x64 image" in err
    assert patch_cli.main(["train", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_patch_cnn_speaks_the_protocol(trained, tmp_path):
    from classifiers.protocol import Model, load_model
    from conftest import prediction_columns

    trained.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, PatchCNN) and isinstance(loaded, Model) and loaded.kind == "patch_cnn"
    write_image(tmp_path / "tumour.png", make_image("invasive", np.random.default_rng([1, 98]), SIZE))
    write_image(tmp_path / "normal.png", make_image("normal", np.random.default_rng([1, 99]), SIZE))
    result = loaded.predict_images([tmp_path / "normal.png", tmp_path / "tumour.png"])
    table = result.table
    assert list(table.columns) == prediction_columns(loaded.classes)
    assert table["n_aug"].tolist() == [4 * 5, 4 * 5]  # 128 x 160 in 32-pixel windows
    assert table["prediction"].tolist() == ["non-tumour", "tumour"]
    assert (table[["votes_non-tumour", "votes_tumour"]].sum(axis=1) == 20).all()
    maker = loaded.heatmaps()
    assert (maker.window, maker.step) == (32, 8)
