"""Issue 13 items 17-19: the shared atomic writes sync, swap and respect the umask."""
from __future__ import annotations

import os
import stat

import pytest

from data.files import atomic_directory, atomic_write_text


def _record_fsyncs(monkeypatch) -> list:
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    return synced


def test_atomic_write_syncs_file_then_directory(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    atomic_write_text(tmp_path / "state.json", "{}")  # checkpoints' state, store configs, ...
    assert os.path.basename(synced[0]).startswith(".tmp-") and synced[-1] == str(tmp_path)


def test_atomic_directory_syncs_the_new_tree_and_deletes_the_old_one_last(tmp_path, monkeypatch):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "a.json").write_text("old")
    synced = _record_fsyncs(monkeypatch)
    with atomic_directory(out) as tmp:
        (tmp / "a.json").write_text("new")
    assert any(p.endswith("a.json") for p in synced) and str(tmp_path) in synced
    assert (out / "a.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_directory_write_leaves_the_old_one_and_kept_entries(tmp_path):
    out = tmp_path / "report"
    with atomic_directory(out) as tmp:
        (tmp / "metrics.json").write_text("old")
        (tmp / "two_stage_folds").mkdir()
    with pytest.raises(OSError):
        with atomic_directory(out, keep=("two_stage_folds",)) as tmp:
            raise OSError(28, "No space left on device")
    assert (out / "metrics.json").read_text() == "old" and (out / "two_stage_folds").is_dir()
    with atomic_directory(out, keep=("two_stage_folds",)) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert (out / "two_stage_folds").is_dir() and (out / "metrics.json").read_text() == "new"


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "m") as tmp:
            (tmp / "model.json").write_text("{}")
        atomic_write_text(tmp_path / "m" / "x.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "x.json").stat().st_mode) == 0o644
