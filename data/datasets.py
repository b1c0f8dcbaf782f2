"""Discovering labelled image datasets.

:func:`load_dataset` turns either a class-folder tree or a CSV manifest into
one table, validating everything up front (files exist, labels are known and
mappable, no duplicates) so that errors surface before any feature
extraction starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .io import IMAGE_EXTENSIONS, is_image_file, list_images
from .labels import CANONICAL_LABELS, canonical_label, map_labels

__all__ = ["COLUMNS", "DatasetError", "load_dataset"]

#: Columns of the table returned by :func:`load_dataset`.
COLUMNS: tuple[str, ...] = ("image_id", "path", "label", "group")

# How many offending items an error message lists before summarising.
_MAX_LISTED = 5


class DatasetError(ValueError):
    """A dataset folder or manifest is malformed; the message says where and why."""


def load_dataset(source: str | os.PathLike, *, scheme: str | None = None) -> pd.DataFrame:
    """List the images and labels of a dataset.

    Parameters
    ----------
    source : str or os.PathLike
        Either

        * a directory with one sub-folder per class, named by its label (any
          spelling accepted by :func:`data.labels.canonical_label`, e.g.
          ``Normal/``, ``InSitu/``). Images are searched recursively inside
          each class folder; non-image files (``labels.csv``, ``README``...)
          and hidden files/folders are ignored, as are sub-folders with an
          unknown name that contain no images; or
        * a CSV manifest with columns ``path,label[,group]``. Relative paths
          are relative to the CSV's folder; absolute paths are allowed.
          Backslashes are read as path separators.
    scheme : {'bach4', 'bmc3', 'binary'}, optional
        If given, check that the labels can be mapped into this scheme (see
        :func:`data.labels.map_labels`). Labels are *not* mapped: the
        ``label`` column keeps the canonical source labels.

    Returns
    -------
    pandas.DataFrame
        One row per image, sorted by ``image_id``, with columns

        * ``image_id`` - path relative to the dataset root (the folder, or
          the CSV's folder) with ``/`` separators; stable and unique. Files
          outside the root use their absolute POSIX path.
        * ``path`` - absolute path (str).
        * ``label`` - canonical label (see :data:`data.labels.CANONICAL_LABELS`).
        * ``group`` - patient/specimen id from the manifest's ``group``
          column; equals ``image_id`` when not given (folder datasets, no
          column, or an empty cell).

    Raises
    ------
    DatasetError
        If the source does not exist or is not a directory/CSV, a class
        folder or the whole dataset has no images, a sub-folder or label is
        unknown, manifest columns or files are missing, a path is listed
        twice, or labels cannot be mapped to `scheme`. Nothing is read or
        computed before these checks pass.
    """
    root = Path(os.path.abspath(source))
    if not root.exists():
        raise DatasetError(f"dataset source '{root}' does not exist")
    if root.is_dir():
        table = _scan_folder(root)
    elif root.suffix.lower() == ".csv":
        table = _read_manifest(root)
    else:
        raise DatasetError(f"dataset source '{root}' must be a directory of class folders or a .csv manifest")

    if scheme is not None:
        try:
            map_labels(table["label"], scheme)
        except ValueError as exc:
            raise DatasetError(f"dataset '{root}': {exc}") from None
    return table.sort_values("image_id", ignore_index=True)[list(COLUMNS)]


def _is_hidden(rel: Path) -> bool:
    # Dot-files (e.g. macOS "._x.jpg" resource forks) and "__MACOSX" are not data.
    return any(part.startswith((".", "__")) for part in rel.parts)


def _format_list(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... (+{more} more)" if more > 0 else "")


def _scan_folder(root: Path) -> pd.DataFrame:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(Path(p.name)))
    rows = []
    for sub in subdirs:
        images = list_images(sub)
        try:
            label = canonical_label(sub.name)
        except ValueError:
            if not images:
                continue  # unrelated empty/non-image folder: harmless
            raise DatasetError(
                f"dataset folder '{root}': sub-folder '{sub.name}' ({len(images)} images) is not a known "
                f"label; accepted labels: {', '.join(CANONICAL_LABELS)}"
            ) from None
        if not images:
            raise DatasetError(
                f"dataset folder '{root}': class folder '{sub.name}' contains no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        rows += [(p.relative_to(root).as_posix(), str(p), label) for p in images]

    if not rows:
        loose = [p.name for p in root.iterdir() if is_image_file(p) and p.is_file()]
        hint = (
            f"; found {len(loose)} images directly in it - images must be inside one sub-folder per class"
            if loose
            else ""
        )
        raise DatasetError(f"dataset folder '{root}' has no class sub-folders with images{hint}")
    table = pd.DataFrame(rows, columns=["image_id", "path", "label"])
    table["group"] = table["image_id"]
    return table


def _read_manifest(csv_path: Path) -> pd.DataFrame:
    try:
        # dtype=str keeps ids such as "007"; empty cells become "".
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"manifest '{csv_path}' is not a readable CSV file: {exc}") from None
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    missing = [c for c in ("path", "label") if c not in raw.columns]
    if missing:
        raise DatasetError(
            f"manifest '{csv_path}' lacks column(s) {', '.join(missing)}; "
            f"expected path,label[,group], found {', '.join(raw.columns) or 'none'}"
        )
    if raw.empty:
        raise DatasetError(f"manifest '{csv_path}' lists no images")

    # Line numbers as seen in an editor: header is line 1.
    lines = raw.index.to_numpy() + 2
    paths = raw["path"].str.strip()
    labels = raw["label"].str.strip()

    blank = [str(n) for n, p, lab in zip(lines, paths, labels) if not p or not lab]
    if blank:
        raise DatasetError(f"manifest '{csv_path}': empty path or label on line(s) {_format_list(blank)}")

    bad_labels = []
    canon = []
    for n, lab in zip(lines, labels):
        try:
            canon.append(canonical_label(lab))
        except ValueError:
            bad_labels.append(f"line {n}: {lab!r}")
    if bad_labels:
        raise DatasetError(
            f"manifest '{csv_path}': unknown label(s) {_format_list(bad_labels)}; "
            f"accepted labels: {', '.join(CANONICAL_LABELS)}"
        )

    base = csv_path.parent
    abs_paths = [os.path.normpath(base / p.replace("\\", "/")) for p in paths]

    not_images = [p for p in paths if not is_image_file(p)]
    if not_images:
        raise DatasetError(
            f"manifest '{csv_path}': {len(not_images)} path(s) are not image files "
            f"({', '.join(IMAGE_EXTENSIONS)}): {_format_list(not_images)}"
        )

    seen: dict[str, int] = {}
    duplicates = []
    for n, p, ap in zip(lines, paths, abs_paths):
        if ap in seen:
            duplicates.append(f"{p} (lines {seen[ap]} and {n})")
        else:
            seen[ap] = n
    if duplicates:
        raise DatasetError(f"manifest '{csv_path}': duplicate path(s) {_format_list(duplicates)}")

    missing_files = [p for p, ap in zip(paths, abs_paths) if not os.path.isfile(ap)]
    if missing_files:
        raise DatasetError(
            f"manifest '{csv_path}': {len(missing_files)} of {len(paths)} listed files do not exist "
            f"(relative paths are resolved against '{base}'): {_format_list(missing_files)}"
        )

    image_ids = [_image_id(ap, base) for ap in abs_paths]
    table = pd.DataFrame({"image_id": image_ids, "path": abs_paths, "label": canon})
    groups = raw["group"].str.strip() if "group" in raw.columns else pd.Series("", index=raw.index)
    table["group"] = groups.where(groups != "", table["image_id"]).to_numpy()
    return table


def _image_id(abs_path: str, base: Path) -> str:
    """POSIX path relative to `base`, or the absolute POSIX path if outside it."""
    try:
        rel = os.path.relpath(abs_path, base)
    except ValueError:  # different drive on Windows
        return Path(abs_path).as_posix()
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return Path(abs_path).as_posix()
    return Path(rel).as_posix()
