"""File utilities every layer shares: atomic writes, file hashes, the package version.

Written once here, at the bottom of the dependency order (data <- features <- classifiers <-
pipeline), so stores, model directories and checkpoints write and identify files alike.

    >>> atomic_write("model.json", lambda tmp: Path(tmp).write_text("{}"))  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

#: Temporary files and directories start with this, so a killed run's leftovers are found.
TEMP_PREFIX = ".tmp-"


def _temporary_name(path: Path) -> Path:
    # Same directory (os.replace is atomic only within a filesystem) and same suffix (Keras
    # and NumPy choose the format from it).
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def fsync_path(path: Path | str) -> None:
    """Flush a file's or a directory's data to the disk (a rename is durable only once its
    directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp)`` on a temporary file beside `path`, then rename it to `path`.

    A reader sees the old file or the complete new one, never a partial one; on any error the
    temporary file is removed and `path` is untouched.  The file is synced before the rename
    and its directory after it, so a renamed file also survives a power loss.  The writer
    creates the file, so the umask decides who may read it (as for every other output).
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        writer(tmp)
        fsync_path(tmp)  # the data first: a power loss must not leave a renamed empty file
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (an existing
    `path` is removed first), on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()  # mkdir, not mkdtemp (0700): model directories are meant to be shared
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(directory: Path | str) -> None:
    """Delete the temporary files a killed run left in `directory`."""
    for stale in Path(directory).glob(f"{TEMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed (weights files are 10-100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_version(distribution: str = "breast-histology-pipeline") -> str:
    """Installed version of `distribution` (``0+unknown`` from an uninstalled source tree)."""
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:
        return "0+unknown"


#: Distributions whose versions change features or predictions; first installed name wins.
_VERSIONED = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly"),
    "keras": ("keras",),
    "numpy": ("numpy",),
    "opencv": ("opencv-python", "opencv-python-headless", "opencv-contrib-python"),
    "staintools": ("staintools",),
    "xgboost": ("xgboost",),
    "scikit-learn": ("scikit-learn",),
}


@functools.lru_cache(maxsize=1)
def software_versions() -> dict:
    """Versions of Python, this package and the libraries the numbers depend on, read from the
    installed metadata without importing them (``None``: not installed)."""
    found = {"python": platform.python_version(), "breast-histology-pipeline": package_version()}
    for name, distributions in _VERSIONED.items():
        installed = (package_version(d) for d in distributions)
        found[name] = next((v for v in installed if v != "0+unknown"), None)
    return found


def version_differences(recorded: dict, current: dict | None = None, names=None) -> list[str]:
    """``"numpy 1.26.4 -> 2.1.0"`` for every library whose version differs from `recorded`
    (only libraries `recorded` names: an old record without versions gives no difference)."""
    current = software_versions() if current is None else current
    names = recorded if names is None else [n for n in names if n in recorded]
    return [f"{n} {recorded[n]} -> {current.get(n)}" for n in names
            if n != "breast-histology-pipeline" and recorded.get(n) != current.get(n)]
