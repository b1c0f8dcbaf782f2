"""Issue 13: extraction inputs that must not abort or corrupt a run, batch-size keyed features."""
from __future__ import annotations

import shutil
import threading
from dataclasses import replace

import numpy as np
import pytest

from data.datasets import load_dataset
from data.io import read_image, write_image
from features import extract as extract_mod
from features.config import ExtractionConfig
from features.extract import extract_in_memory, extract_to_store, make_config
from features.store import load_store
from pipeline import extract as cli

TINY = dict(backbone="efficientnet_lite0", weights=None, stain_reference="none", augmentations=2,
            crops=2, crop_size=48, scale=1.0)


# -- item 8: the batch size is part of the store key, and predict uses the store's ------------


def test_batch_size_keys_the_store_and_a_resume_cannot_mix_it(tiny_dataset, tmp_path):
    three = make_config(tiny_dataset, batch_size=3, **TINY)
    eight = make_config(tiny_dataset, **TINY)
    assert eight.batch_size == 8 and three.config_hash != eight.config_hash
    assert "batch_size" not in eight.hashed_dict()  # stores made with the old default keep their key
    with pytest.raises(ValueError, match="batch_size 5 differs"):
        extract_to_store(tiny_dataset, three, tmp_path, batch_size=5, progress=False)


def test_in_memory_features_reproduce_the_store_with_its_batch_size(tiny_dataset, tmp_path):
    config = make_config(tiny_dataset, batch_size=3, **TINY)
    extract_to_store(tiny_dataset, config, tmp_path, progress=False)
    stored = load_store(tmp_path)
    table, _ = extract_in_memory(tiny_dataset, config)  # as predict calls it: no batch size given
    np.testing.assert_array_equal(table.X, stored.X)


def test_in_memory_extraction_decodes_the_first_image_while_the_backbone_builds(tiny_dataset, monkeypatch):
    """Issue 16 item 5: predict's image side (decode + Macenko) starts before the model build,
    and the features are those of a backbone built first (the store's path)."""
    tiny = {k: v for k, v in TINY.items() if k != "stain_reference"}  # the default: Macenko on
    config = make_config(tiny_dataset, **tiny)
    first_image = threading.Event()
    host_items = extract_mod.iter_host_items

    def watched(*args, **kwargs):
        for item in host_items(*args, **kwargs):
            if item[0] == "image":  # decoded and stain-normalised
                first_image.set()
            yield item

    seen = []

    class Extractor(extract_mod.FeatureExtractor):
        def __init__(self, *args, **kwargs):
            seen.append(first_image.wait(timeout=60))  # never set if the build came first
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "iter_host_items", watched)
    monkeypatch.setattr(extract_mod, "FeatureExtractor", Extractor)
    table, summary = extract_in_memory(tiny_dataset, config)
    assert seen == [True] and summary.device.startswith("CPU")
    monkeypatch.undo()
    extractor = extract_mod.FeatureExtractor(config)  # built before any image is read
    expected = [f for _, f, _ in extract_mod.iter_image_features(
        list(tiny_dataset.itertuples(index=False)), config, extractor, extract_mod.ExtractionSummary())]
    assert table.X.shape == (2 * len(tiny_dataset), 1280)
    np.testing.assert_array_equal(table.X, np.concatenate(expected))


# -- item 10: an image too small for the backbone is skipped, the run goes on -------------


def test_tiny_image_is_skipped_with_its_reason(tiny_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    write_image(data / "benign" / "aaa_tiny.png", np.full((30, 40, 3), 120, np.uint8))
    (data / "normal" / "zzz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dataset = load_dataset(data)
    summary = extract_to_store(dataset, make_config(dataset, **TINY), tmp_path / "store", progress=False)
    assert len(summary.done) == 8
    reasons = {s["image_id"]: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"benign/aaa_tiny.png", "normal/zzz_broken.png"}
    assert "too small" in reasons["benign/aaa_tiny.png"] and "minimum input 32" in reasons["benign/aaa_tiny.png"]


# -- item 12: zero crop size and scale are rejected, not replaced --------------------------


@pytest.mark.parametrize("option, value, message", [("crop_size", 0, "crop_size must be >= 16"),
                                                    ("scale", 0.0, r"scale must be in \(0, 4\]")])
def test_zero_crop_size_and_scale_are_rejected(tiny_dataset, option, value, message):
    weights, stain, crop_size, scale, _ = extract_mod.backbone_options(
        "efficientnet_lite0", weights="none", stain_reference="none", **{option: value})
    with pytest.raises(ValueError, match=message):
        make_config(tiny_dataset, backbone="efficientnet_lite0", weights=weights, stain_reference=stain,
                    crop_size=crop_size, scale=scale)


@pytest.mark.parametrize("flag", ["--crop-size", "--scale"])
def test_cli_rejects_zero_before_work(tiny_dir, tmp_path, capsys, monkeypatch, flag):
    monkeypatch.setattr(extract_mod, "extract_to_store", lambda *a, **k: pytest.fail("extraction ran"))
    assert cli.main(["--data", str(tiny_dir), "--out", str(tmp_path), "--weights", "none", flag, "0"]) == 2
    assert "invalid extraction config" in capsys.readouterr().err


# -- item 14: late errors leave no empty store, and are clear errors -------------------------


@pytest.mark.parametrize("extra, message", [(["--batch-size", "0"], "batch_size must be >= 1"),
                                            (["--seed", "-1"], "seed must be in"),
                                            (["--weights", "BAD"], "cannot load the efficientnet_lite0 weights file")])
def test_late_errors_leave_no_store_directory(tiny_dir, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.pth"
    bad.write_text("garbage\n")
    out = tmp_path / "root"
    args = ["--data", str(tiny_dir), "--out", str(out), "--stain-reference", "none", "--augmentations", "1",
            "--crops", "1", "--crop-size", "32", "--scale", "1", "--quiet"]
    args += [str(bad) if a == "BAD" else a for a in extra]
    if "--weights" not in extra:
        args += ["--weights", "none"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not list(out.glob("*/config.json")) if out.exists() else True
    if "--weights" in extra:
        assert str(bad) in err


# -- item 20: crops stream in batches, whatever --crops ------------------------------------


def test_crops_stream_in_batches(tiny_dataset, monkeypatch):
    # The image goes to the device once; crops are cut there a batch at a time, so memory does
    # not grow with --crops.  The crops are those of features.augment.augmented_crops.
    from features.augment import ColorAugmentation, augmented_crops
    from features.image_side import iter_host_items

    config = ExtractionConfig(weights="none", stain=None, augmentations=2, crops=7, crop_size=32, scale=1.0,
                              batch_size=3)
    row = tiny_dataset.iloc[0]
    items = list(iter_host_items([row], config))
    assert [i[0] for i in items] == ["start", "image", "aug", "aug", "end"]
    assert [p[1].shape for kind, _, p in (i for i in items if i[0] == "aug")] == [(7, 3), (7, 3)]
    extractor = extract_mod.FeatureExtractor(config)
    sizes, real = [], extractor.crop_features

    def spy(image, luts, windows):
        sizes.append(len(luts))
        return real(image, luts, windows)

    monkeypatch.setattr(extractor, "crop_features", spy)
    result = extract_mod.extract_one_image(row, config, extractor)
    assert sizes == [3, 3, 3, 3, 2] and result.crops == 14
    host = [extractor.run_batch(c) for c in
            np.array_split(augmented_crops(read_image(row.path), seed=0, image_id=row.image_id, aug_index=1,
                                           n_crops=7, crop_size=32,
                                           color=ColorAugmentation(config.color_gain, config.color_shift)), 3)]
    crop_features = np.concatenate(host)
    np.testing.assert_allclose(result.features[1], crop_features.mean(0), rtol=1e-6)


# -- item 11: a non-UTF-8 file name is skipped by name, not fatal ----------------------------


def test_non_utf8_file_name_is_skipped_by_name(tiny_dir, tmp_path, caplog):
    import os

    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    source = sorted((data / "benign").iterdir())[0]
    shutil.copy(source, os.path.join(os.fsencode(data / "benign"), b"bad\xffname.png"))
    with caplog.at_level("WARNING"):
        dataset = load_dataset(data)
    assert len(dataset) == 8
    assert "bad\\xffname.png" in caplog.text and "not valid UTF-8" in caplog.text
