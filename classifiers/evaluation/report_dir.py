"""A report directory written whole: refused before any work when taken, swapped in when done."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data.files import atomic_directory, check_output_dir

#: Left in REPORT_DIR by an interrupted two-stage run, to resume: not a report, kept in the new one.
RESUMABLE = ("two_stage_folds",)


def is_report(path: Path) -> bool:
    """Whether ``path`` holds a report (what ``overwrite`` may replace)."""
    return (Path(path) / "metrics.json").is_file() or (Path(path) / "ensemble.csv").is_file()


def check_report_out(out, overwrite: bool) -> Path:
    """Refuse, before any work, an ``out`` that is a file, or a non-empty directory without
    ``overwrite`` (or with it, when it is not a report)."""
    return check_output_dir(out, overwrite=overwrite, is_ours=is_report, what="report", resumable=RESUMABLE)


def write_report_dir(out, write: Callable[[Path], dict]) -> dict:
    """Write the report with ``write(tmp)`` into a temporary directory and swap it into ``out``:
    a full disk or an interrupt leaves the previous report whole, and no stale file of it
    survives in the new one.  Paths in the returned ``files`` are those under ``out``."""
    with atomic_directory(out, keep=RESUMABLE) as tmp:
        written = write(tmp)
    tmp, out = str(tmp), str(Path(out))
    written["files"] = [out + f[len(tmp):] if f.startswith(tmp) else f for f in written["files"]]
    return written
