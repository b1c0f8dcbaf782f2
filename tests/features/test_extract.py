"""End-to-end extraction on tiny synthetic images with random-init backbones."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from data.datasets import load_dataset
from data.synthetic import write_dataset
from features import extract as extract_mod
from features.backbones import WeightsNotFoundError, get_backbone, resolve_weights
from features.extract import extract_to_store, make_config
from features.store import FeatureStore, load_store
from features.transforms import scale_image
from pipeline import extract as cli
from conftest import TINY_PROTOCOL

ROOT = Path(__file__).resolve().parents[2]
SMALL = {**TINY_PROTOCOL, "batch_size": 3}  # the batch size of every extract_to_store below


@pytest.fixture(scope="module")
def config(tiny_dataset):
    return make_config(tiny_dataset, backbone="efficientnet_lite0", weights=None, **SMALL)


@pytest.fixture(scope="module")
def clean_store(tiny_dataset, config, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    summary = extract_to_store(tiny_dataset, config, root, batch_size=3, progress=False)
    return root, summary


def test_end_to_end_store_contents(clean_store, tiny_dataset, config):
    root, summary = clean_store
    assert len(summary.done) == 8 and summary.skipped == []
    assert summary.crops == 8 * 2 * 2
    table = load_store(root)
    assert table.X.shape == (16, 1280) and table.X.dtype == np.float32
    assert np.isfinite(table.X).all()
    assert list(table.meta.columns[:4]) == ["image_id", "label", "group", "aug"]
    assert sorted(table.meta.image_id.unique()) == sorted(tiny_dataset.image_id)
    assert table.meta.groupby("image_id").aug.apply(list).map(tuple).unique().tolist() == [(0, 1)]
    record = json.loads((summary.store_path / "config.json").read_text())
    assert record["config_hash"] == config.config_hash
    assert record["stain"]["method"] == "macenko" and len(record["stain"]["stain_matrix"]) == 2
    assert record["backbone"] == "efficientnet_lite0" and record["weights"] == "none"
    assert summary.store_path.name == f"efficientnet_lite0-{config.config_hash[:12]}"


def test_rerun_does_no_work_and_is_bit_identical(clean_store, tiny_dataset, config, tmp_path):
    root, _ = clean_store
    again = extract_to_store(tiny_dataset, config, root, batch_size=3, progress=False)
    assert again.done == [] and len(again.cached) == 8
    other = extract_to_store(tiny_dataset, config, tmp_path, batch_size=3, progress=False)
    np.testing.assert_array_equal(load_store(root).X, load_store(tmp_path).X)
    assert len(other.done) == 8


def test_changed_config_gets_its_own_store(clean_store, tiny_dataset, config):
    root, summary = clean_store
    for change in ({"seed": 1}, {"pooling": "max"}, {"crop_size": 40}, {"stain_reference": "none"},
                   {"stain_method": "vahadane"}):
        options = {**SMALL, "seed": 0, **change}
        changed = make_config(tiny_dataset, backbone="efficientnet_lite0", weights=None, **options)
        assert changed.config_hash != config.config_hash, change
    assert FeatureStore(root, config).path == summary.store_path


def test_interrupted_run_resumes_to_the_clean_result(clean_store, tiny_dataset, config, tmp_path,
                                                      monkeypatch):
    written = []
    real_write = FeatureStore.write

    def write_then_die(self, record):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_write(self, record)
        written.append(record["image_id"])

    monkeypatch.setattr(FeatureStore, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(tiny_dataset, config, tmp_path, batch_size=3, progress=False)
    monkeypatch.setattr(FeatureStore, "write", real_write)
    store_dir = FeatureStore(tmp_path, config).path
    assert len(list((store_dir / "images").glob("*.joblib"))) == 3
    resumed = extract_to_store(tiny_dataset, config, tmp_path, batch_size=3, progress=False)
    assert len(resumed.cached) == 3 and len(resumed.done) == 5
    clean = load_store(clean_store[0])
    np.testing.assert_array_equal(load_store(tmp_path).X, clean.X)
    pd.testing.assert_frame_equal(load_store(tmp_path).meta, clean.meta)


def test_workers_give_the_store_of_one_thread(clean_store, tiny_dataset, config, tmp_path):
    # Two processes decode and normalise ahead of the backbone; the store is the same bytes.
    summary = extract_to_store(tiny_dataset, config, tmp_path, batch_size=3, progress=False, workers=2)
    assert summary.done == list(tiny_dataset.image_id)  # in input order
    clean = load_store(clean_store[0])
    np.testing.assert_array_equal(load_store(tmp_path).X, clean.X)
    pd.testing.assert_frame_equal(load_store(tmp_path).meta, clean.meta)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        extract_to_store(tiny_dataset, config, tmp_path, workers=0)


def test_default_workers_leave_a_core_to_the_backbone(monkeypatch):
    from features.image_side import default_workers

    for cores, expected in ((1, 1), (2, 1), (4, 3), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        assert default_workers() == expected


def _descendants(pid: int) -> list:
    """Processes below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_mid_run_loses_no_finished_image(tiny_dir, clean_store, tmp_path, workers):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "pipeline.extract", "--data", str(tiny_dir), "--out", str(out),
           "--weights", "none", "--augmentations", "2", "--crops", "2", "--crop-size", "48",
           "--scale", "1", "--batch-size", "3", "--quiet", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def records():  # not the ".tmp-*" file of a write in progress (it also ends in .joblib)
        return [p for p in out.glob("*/images/*.joblib") if not p.name.startswith(".")]

    deadline = time.time() + 600  # a bound for a loaded machine, not a speed check
    while time.time() < deadline:
        if len(records()) >= 2:
            break
        time.sleep(0.05)
    helpers = _descendants(proc.pid)  # the workers (and their fork server) with --workers 2
    assert len(helpers) >= 2 or workers == 1 or not Path("/proc").is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(records())
    assert finished >= 2
    deadline = time.time() + 120  # the workers notice within a second or so
    while time.time() < deadline and any(_alive(pid) for pid in helpers):
        time.sleep(0.2)
    assert not [pid for pid in helpers if _alive(pid)], "worker processes outlived a kill -9"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"already in the store: {min(finished, 8)}" in done.stdout
    np.testing.assert_array_equal(load_store(out).X, load_store(clean_store[0]).X)


def test_corrupt_and_blank_images_are_reported_not_fatal(tiny_dir, config, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    (data / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    from data.io import write_image

    write_image(data / "normal" / "white.png", np.full((64, 80, 3), 255, np.uint8))
    ds = load_dataset(data)
    summary = extract_to_store(ds, config, tmp_path / "store", batch_size=3, progress=False)
    assert len(summary.done) == 9
    assert [s["image_id"] for s in summary.skipped] == ["benign/broken.png"]
    assert [u["image_id"] for u in summary.unnormalized] == ["normal/white.png"]
    assert "tissue mask" in summary.unnormalized[0]["reason"]
    skipped = json.loads((summary.store_path / "skipped.json").read_text())
    assert skipped[0]["image_id"] == "benign/broken.png" and skipped[0]["reason"]
    table = load_store(tmp_path / "store")
    notes = table.meta.drop_duplicates("image_id").set_index("image_id").stain_note
    assert "tissue mask" in notes["normal/white.png"] and notes.drop("normal/white.png").isna().all()


def test_changed_source_file_is_re_extracted(tiny_dir, config, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    store = tmp_path / "store"
    extract_to_store(load_dataset(data), config, store, batch_size=3, progress=False)
    target = sorted((data / "invasive").glob("*.png"))[0]
    shutil.copy(sorted((data / "normal").glob("*.png"))[0], target)
    again = extract_to_store(load_dataset(data), config, store, batch_size=3, progress=False)
    assert again.done == ["invasive/" + target.name]


def test_missing_imagenet_weights_fail_fast_with_instructions(monkeypatch, tmp_path, tiny_dataset):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    # "before any work": not a single image may be read before the weights are checked
    monkeypatch.setattr(extract_mod, "read_image", lambda path: pytest.fail("image read"))
    with pytest.raises(WeightsNotFoundError) as err:
        make_config(tiny_dataset, backbone="resnet50", weights="imagenet", **TINY_PROTOCOL)
    message = str(err.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "models") in message
    assert "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" in message
    with pytest.raises(WeightsNotFoundError, match="xception_weights_tf_dim_ordering"):
        resolve_weights(get_backbone("xception"), "imagenet")
    with pytest.raises(WeightsNotFoundError, match="not found"):
        resolve_weights(get_backbone("resnet50"), str(tmp_path / "nope.h5"))


@pytest.mark.parametrize("name, side", [("resnet50", 64), ("xception", 72)])
def test_keras_backbones_random_init(name, side):
    from features.config import ExtractionConfig
    from features.extract import FeatureExtractor

    config = ExtractionConfig(backbone=name, weights="none", crop_size=side)
    extractor = FeatureExtractor(config, batch_size=2)
    crops = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    feats = extractor.features(crops)
    assert feats.shape == (3, get_backbone(name).feature_dim)
    # zero padding of the last batch must not leak into the real crops' features
    np.testing.assert_allclose(extractor.features(crops[2:]), feats[2:], rtol=1e-5, atol=1e-5)


def test_cli_bad_input_is_a_clear_error_before_work(tmp_path, capsys, tiny_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--data", str(empty), "--out", str(tmp_path / "o"), "--weights", "none"]) == 2
    assert str(empty) in capsys.readouterr().err
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nmissing.png,benign\n")
    assert cli.main(["--data", str(manifest), "--out", str(tmp_path / "o"), "--weights", "none"]) == 2
    assert "missing.png" in capsys.readouterr().err
    # Any class name is valid, but two spellings of one class are caught before any work.
    benign = sorted(tiny_dir.glob("benign/*.png"))
    manifest.write_text(f"path,label\n{benign[0]},grade-1\n{benign[1]},Grade_1\n")
    assert cli.main(["--data", str(manifest), "--out", str(tmp_path / "o"), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "differ only in case" in err and "m.csv" in err
    assert not (tmp_path / "o").exists()


def test_cli_runs_and_reports(tiny_dir, tmp_path, capsys):
    args = ["--data", str(tiny_dir), "--out", str(tmp_path), "--weights", "none",
            "--augmentations", "2", "--crops", "2", "--crop-size", "48", "--scale", "1",
            "--quiet"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "images extracted now: 8, already in the store: 0, skipped: 0" in out
    assert "crops/s" in out and "CPU" in out
    assert cli.main(args) == 0
    assert "images extracted now: 0, already in the store: 8" in capsys.readouterr().out


def test_shared_mode_is_its_own_reproducible_store(tiny_dataset, config, clean_store, tmp_path):
    from dataclasses import replace

    shared = replace(config, mode="shared", batch_size=2)
    assert shared.config_hash != config.config_hash
    first = extract_to_store(tiny_dataset, shared, tmp_path / "a", batch_size=2, progress=False)
    extract_to_store(tiny_dataset, shared, tmp_path / "b", batch_size=2, progress=False)
    a, b = load_store(tmp_path / "a"), load_store(tmp_path / "b")
    np.testing.assert_array_equal(a.X, b.X)
    assert first.crops == 8 * 2 * 2 and a.X.shape == load_store(clean_store[0]).X.shape
    exact = load_store(clean_store[0]).X
    cos = (a.X * exact).sum(1) / np.linalg.norm(a.X, axis=1) / np.linalg.norm(exact, axis=1)
    assert cos.mean() > 0.5  # random-init weights: similar, not equal (see test_feature_maps)


def test_whole_mode_ignores_crop_options_and_pools_the_whole_map(tiny_dataset, tmp_path):
    kwargs = dict(backbone="efficientnet_lite0", weights=None, stain_reference="none",
                  augmentations=2, scale=1.0, mode="whole")
    config = make_config(tiny_dataset, crops=7, crop_size=48, pooling="max", **kwargs)
    assert (config.crops, config.crop_size, config.pooling) == (1, 0, "mean")
    assert make_config(tiny_dataset, **kwargs).config_hash == config.config_hash
    with pytest.raises(ValueError, match="mode 'whole' has no crops"):
        replace_config = dict(config.to_dict(), crops=3)
        type(config).from_dict(replace_config)
    summary = extract_to_store(tiny_dataset, config, tmp_path, batch_size=8, progress=False)
    assert summary.crops == len(tiny_dataset) * 2  # one backbone pass per augmented image
    table = load_store(tmp_path)
    assert table.X.shape == (len(tiny_dataset) * 2, 1280)
    # Augmentation 0 is the original image: its feature is the mean of the image's map.
    row = tiny_dataset.iloc[0]
    extractor = extract_mod.FeatureExtractor(config, batch_size=1)
    image = scale_image(extract_mod.read_image(row.path), 1.0)
    expected = extractor.feature_maps(image[None])[0].mean(axis=(0, 1))
    got = table.X[(table.meta.image_id == row.image_id).to_numpy() & (table.meta.aug == 0).to_numpy()][0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
