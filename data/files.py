"""File utilities every layer shares: atomic writes, file hashes, the package version.

Written once here, at the bottom of the dependency order (data <- features <- classifiers <-
pipeline), so stores, model directories and checkpoints write and identify files alike.

    >>> atomic_write("model.json", lambda tmp: Path(tmp).write_text("{}"))  # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import ctypes.util
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


def fsync_tree(root: Path | str) -> None:
    """Sync every file and directory below `root`, then `root` itself."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (``renameat2``, Linux >= 3.15); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put directory `tmp` at `path`; an existing `path` is deleted only once `tmp` is there."""
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # tmp now holds the old directory
    else:  # rename aside; a crash between the renames leaves the old one under its .old name
        old = path.with_name(f"{TEMP_PREFIX}old-{tmp.name}")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old)


@contextmanager
def atomic_directory(path: Path | str, keep: tuple = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`, on error it is
    deleted and `path` is untouched.

    The new directory is synced, then swapped in (one atomic exchange on Linux), and only then
    is the old one deleted: an interrupt, a full disk or a power loss leaves the old directory
    or the new one, never a mix or neither.  Entries named in `keep` that the old directory
    holds and the new one does not (e.g. finished folds of a resumable run) are moved into the
    new one before the swap, and back if it fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()  # mkdir, not mkdtemp (0700): model directories are meant to be shared
    moved = []
    try:
        yield tmp
        for name in keep:
            if (path / name).exists() and not (tmp / name).exists():
                os.rename(path / name, tmp / name)
                moved.append(name)
        fsync_tree(tmp)
        _swap_in(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        for name in moved:  # never lose the kept entries with the temporary directory
            if (tmp / name).exists() and path.is_dir() and not (path / name).exists():
                os.rename(tmp / name, path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: Path | str, *, overwrite: bool, is_ours: Callable[[Path], bool], what: str,
                     resumable: tuple = ()) -> Path:
    """Refuse, before any work, an output directory that :func:`atomic_directory` must not
    replace.

    `out` may be missing, an empty directory, a directory holding only `resumable` entries
    (work an interrupted run left to resume), or, with `overwrite`, a directory `is_ours`
    recognises (never any other non-empty directory).  Its parent must be writable.

    Raises
    ------
    FileExistsError
        With a message naming `out` and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"`out` {out} is a file, not a directory; choose another `out`")
    if out.is_dir():
        extra = [p.name for p in out.iterdir() if p.name not in resumable]
        if extra and not overwrite:
            raise FileExistsError(f"`out` {out} already exists and is not empty; choose another `out` or "
                                  f"pass `overwrite` to replace the {what} there")
        if extra and not is_ours(out):
            raise FileExistsError(f"`out` {out} exists and is not a {what}; refusing to replace it")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FileExistsError(f"`out` {out}: cannot create it ({parent} is not a writable directory)")
    return out


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
    "openvino": ("openvino",),  # the optional engine (features.openvino_engine)
    "xgboost": ("xgboost",),
    "lightgbm": ("lightgbm",),  # the optional classifier (classifiers.feature.boosting)
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
