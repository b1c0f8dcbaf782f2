"""Issue 13: feature stores safe to share, no stale or half-written rows (store level)."""
from __future__ import annotations

import json
import os
import stat

import joblib
import numpy as np
import pytest

from features.config import ExtractionConfig
from features import store as store_module
from features.store import FeatureStore, StoreError, load_store, make_record

CLASSES = ("normal", "benign", "insitu", "invasive")


def _config(**kw) -> ExtractionConfig:
    return ExtractionConfig(weights="none", augmentations=2, crops=1, crop_size=32, **kw)


def _record(i: int, image_id: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    label = CLASSES[i % 4]
    return make_record(image_id=image_id or f"{label}/img{i}.png", label=label, group=f"g{i}",
                       path=f"/data/{label}/img{i}.png", source_sha256=f"{i:064x}",
                       features=rng.normal(size=(2, 5)), stain_note=None)


def _store(root, n=8):
    """A store of ``n`` finished images written through the store API."""
    store = FeatureStore(root, _config()).open()
    for i in range(n):
        store.write(_record(i))
    if hasattr(store, "close"):  # release the writer's lock (a store without lock has no close)
        store.close()
    return store


class _RunsShell:
    """Unpickling this calls os.system: what a malicious record would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- item 1: a record cannot run code ---------------------------------------------------


def _craft(store, image_id, payload):
    record = _record(0, image_id)
    record["stain_note"] = payload
    joblib.dump(record, store.record_path(image_id))


def test_crafted_record_does_not_run_code_in_any_reader(tmp_path):
    store = _store(tmp_path / "s")
    marker = tmp_path / "pwned"
    image_id = "normal/img0.png"
    _craft(store, image_id, _RunsShell(marker))
    with pytest.raises(store_module.UnsafeRecordError, match="posix.system|os.system") as info:
        load_store(store.path)
    assert str(store.record_path(image_id)) in str(info.value)
    with pytest.raises(store_module.UnsafeRecordError):  # an extract rerun checks finished images first
        store.is_done(image_id, "0" * 64)
    with pytest.raises(store_module.UnsafeRecordError):
        store.read(image_id)
    assert not marker.exists()


def test_object_array_in_record_is_refused(tmp_path):
    store = _store(tmp_path / "s")
    record = _record(1, "benign/img1.png")
    record["features"] = np.array([[_RunsShell(tmp_path / "pwned")]], dtype=object)
    joblib.dump(record, store.record_path("benign/img1.png"))
    with pytest.raises(store_module.UnsafeRecordError):
        store_module.read_record(store.record_path("benign/img1.png"))
    assert not (tmp_path / "pwned").exists()


def test_train_cli_refuses_crafted_store(tmp_path, capsys):
    from pipeline import train

    store = _store(tmp_path / "s")
    marker = tmp_path / "pwned"
    _craft(store, "normal/img0.png", _RunsShell(marker))
    assert train.main(["--features", str(store.path), "--out", str(tmp_path / "m")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_honest_records_round_trip(tmp_path):
    store = _store(tmp_path / "s")
    table = load_store(store.path)
    assert table.X.shape == (16, 5) and table.X.dtype == np.float32
    np.testing.assert_array_equal(table.X[:2], _record(1)["features"])  # benign/img1 sorts first


# -- item 5: stale records are not used -------------------------------------------------


def test_renamed_and_removed_images_are_ignored(tiny_dir, tmp_path, caplog):
    import shutil

    from data.datasets import load_dataset
    from features.extract import extract_to_store, make_config

    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    config = make_config(load_dataset(data), backbone="efficientnet_lite0", weights=None,
                         stain_reference="none", augmentations=1, crops=1, crop_size=32, scale=1.0)
    extract_to_store(load_dataset(data), config, tmp_path / "store", progress=False)
    benign = sorted((data / "benign").iterdir())
    benign[0].rename(benign[0].with_name("renamed.png"))
    benign[1].unlink()
    dataset = load_dataset(data)
    extract_to_store(dataset, config, tmp_path / "store", progress=False)
    with caplog.at_level("WARNING"):
        table = load_store(tmp_path / "store")
    assert sorted(table.meta.image_id) == sorted(dataset.image_id)
    assert len(table.meta) == 7 and "benign/renamed.png" in set(table.meta.image_id)
    assert "ignored 2 record(s)" in caplog.text


# -- item 6: temporary files are not records --------------------------------------------


def test_temporary_files_are_not_read(tmp_path):
    store = _store(tmp_path / "s")
    (store.images_dir / ".tmp-abc123.joblib").write_bytes(b"")  # a killed writer's empty temp
    joblib.dump(_record(0), store.images_dir / ".tmp-def456.joblib")  # a complete one, not renamed
    table = load_store(store.path)
    assert len(table.meta) == 16 and table.meta.groupby(["image_id", "aug"]).size().max() == 1


def test_store_without_dataset_listing_skips_temporaries(tmp_path):
    store = _store(tmp_path / "s")
    (store.images_dir / ".tmp-abc123.joblib").write_bytes(b"")
    assert len(load_store(store.path).meta) == 16


# -- item 7: two writers ----------------------------------------------------------------


def test_second_writer_stops_clearly_and_keeps_the_first_writers_temporaries(tmp_path):
    first = FeatureStore(tmp_path, _config()).open()
    in_flight = first.images_dir / ".tmp-inflight.joblib"
    in_flight.write_bytes(b"partial")
    with pytest.raises(StoreError, match="another process is extracting"):
        FeatureStore(tmp_path, _config()).open()
    assert in_flight.exists()
    first.close()
    FeatureStore(tmp_path, _config()).open().close()  # the lock is free again: stale temps go
    assert not in_flight.exists()


def test_lock_is_held_by_another_process(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        from features.config import ExtractionConfig
        from features.store import FeatureStore
        s = FeatureStore({str(tmp_path)!r}, ExtractionConfig(weights="none", augmentations=2, crops=1,
                         crop_size=32)).open()
        print("locked", flush=True)
        sys.stdin.readline()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="another process"):
            FeatureStore(tmp_path, _config()).open()
    finally:
        child.communicate("\n", timeout=60)


# -- item 15: damaged files are named with a remedy -------------------------------------


def test_corrupt_config_names_file_and_remedy(tmp_path):
    store = _store(tmp_path / "s")
    (store.path / "config.json").write_text('{"backbone": "effic')
    for action in (lambda: load_store(store.path), lambda: FeatureStore(tmp_path / "s", _config()).open()):
        with pytest.raises(StoreError) as info:
            action()
        message = str(info.value)
        assert str(store.path / "config.json") in message and "extract again" in message


def test_truncated_record_names_file_and_remedy(tmp_path):
    store = _store(tmp_path / "s")
    path = store.record_path("normal/img0.png")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StoreError) as info:
        load_store(store.path)
    assert str(path) in str(info.value) and "rerun pipeline.extract" in str(info.value)
    assert store.is_done("normal/img0.png", f"{0:064x}") is False  # an extract rerun redoes it


# -- items 18, 19: durable and shareable writes ------------------------------------------


def test_records_are_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    store = _store(tmp_path / "s", n=1)
    record = store.record_path("normal/img0.png")
    assert any(os.path.basename(p).startswith(".tmp-") and p.endswith(".joblib") for p in synced)
    assert str(store.images_dir) in synced  # the directory entry of the rename
    assert record.exists()


def test_store_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = _store(tmp_path / "s", n=1)
    finally:
        os.umask(old)
    for path in (store.record_path("normal/img0.png"), store.path / "config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_record_fields_from_numpy_arrays_are_written_readable(tmp_path):
    labels = np.array(CLASSES)  # numpy string scalars, as taken from a label array
    with FeatureStore(tmp_path, _config()) as store:
        store.open()
        store.write(make_record(image_id=np.str_("normal/a.png"), label=labels[0], group=labels[0],
                                path="/d/a.png", source_sha256=np.str_("0" * 64), features=np.ones((2, 3)),
                                stain_note=np.str_("kept")))
    table = load_store(store.path)
    assert table.meta[["image_id", "label", "stain_note"]].values.tolist() == [["normal/a.png", "normal", "kept"]] * 2
