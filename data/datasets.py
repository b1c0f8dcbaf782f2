"""Discovering labelled image datasets.

:func:`load_dataset` turns a class-folder tree, a CSV manifest, the BreakHis distribution (or
any files with BreakHis names) or BACH's official layout into one table, validating everything
up front (files exist, class names are not misspelt, labels fit the scheme, no path twice,
copies of one image kept in one group) so that errors surface before any feature extraction
starts.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import pandas as pd

from . import breakhis
from .duplicates import group_duplicates
from .io import IMAGE_EXTENSIONS, is_image_file, list_images
from .labels import CANONICAL_LABELS, check_class_names, normalise_label
from .mapping import resolve_scheme

__all__ = ["BACH_GROUND_TRUTH", "COLUMNS", "DatasetError", "OPTIONAL_COLUMNS", "load_dataset",
           "select_magnification"]

log = logging.getLogger(__name__)

#: Columns of the table returned by :func:`load_dataset`.
COLUMNS: tuple[str, ...] = ("image_id", "path", "label", "group")
#: Columns added when the data set has them (BreakHis names, or a manifest column).
OPTIONAL_COLUMNS: tuple[str, ...] = ("magnification",)
#: BACH's labels file inside ``ICIAR2018_BACH_Challenge/Photos``.
BACH_GROUND_TRUTH = "microscopy_ground_truth.csv"

# How many offending items an error message lists before summarising.
_MAX_LISTED = 5


class DatasetError(ValueError):
    """A dataset folder or manifest is malformed; the message says where and why."""


def load_dataset(
    source: str | os.PathLike,
    *,
    scheme=None,
    magnification=None,
    breakhis_patients: str = breakhis.PATIENT_GROUPINGS[0],
    duplicates: bool = True,
) -> pd.DataFrame:
    """List the images and labels of a dataset.

    Parameters
    ----------
    source : str or os.PathLike
        One of

        * a directory with one sub-folder per class, named by its class: any names
          (``grade1/``, ``IDC/``...); spellings of known names are normalised
          (``InSitu/`` -> ``insitu``, :func:`data.labels.normalise_label`). Images are
          searched recursively inside each class folder; non-image files and hidden files
          or folders are ignored, as are sub-folders without images (unless named like a
          known class: then it is an error);
        * BACH as distributed: ``ICIAR2018_BACH_Challenge/`` or its ``Photos/`` folder, with
          ``Photos/<Class>/*.tif`` and ``Photos/microscopy_ground_truth.csv`` (the labels come
          from the CSV; a file missing from it, or in another class folder than its label,
          is an error);
        * a folder whose images have BreakHis names (``SOB_B_A-14-22549AB-40-001.png``: the
          BreakHis tree, or any folder of such files, :mod:`data.breakhis`): the label is the
          tumour subtype (``adenosis`` ... ``papillary_carcinoma``; the default ``auto``
          scheme reports benign / malignant), the group the patient, and ``magnification``
          the magnification. Every image must then have a BreakHis name;
        * a CSV manifest with columns ``path,label[,group][,magnification]``. Relative paths
          are relative to the CSV's folder; absolute paths are allowed; backslashes are read
          as path separators. ``label`` may be left out when every file has a BreakHis name;
          for such files an empty ``group`` or ``magnification`` comes from the name.
    scheme : str or LabelScheme, optional
        If given (``auto``, ``classes``, a built-in scheme, a mapping file), check that the
        labels map into it (:func:`data.mapping.resolve_scheme`). Labels are *not* mapped.
    magnification : str, int or list, optional
        Keep only images of these magnifications (``40``, ``"100x"``...). One that is not in
        the data set is an error.
    breakhis_patients : {'number', 'slide'}
        Patient groups of BreakHis names (:data:`data.breakhis.PATIENT_GROUPINGS`): ``number``
        (default) joins slides that share a number, ``slide`` keeps BreakHis's 82 ids.
    duplicates : bool
        Find files with the same content and keep all copies in one group
        (:func:`data.duplicates.group_duplicates`); they are listed in
        ``table.attrs["duplicates"]`` (a list of lists of image ids) and logged.

    Returns
    -------
    pandas.DataFrame
        One row per image, sorted by ``image_id``, with columns

        * ``image_id`` - path relative to the dataset root (the folder, or
          the CSV's folder) with ``/`` separators; stable and unique. Files
          outside the root use their absolute POSIX path.
        * ``path`` - absolute path (str).
        * ``label`` - class name as found (normalised, see above).
        * ``group`` - patient/specimen id from the manifest's ``group``
          column or the BreakHis name; equals ``image_id`` when not given
          (folder datasets, no column, or an empty cell). Copies of one
          image share one group.
        * ``magnification`` - only when the data set has it (a string such as ``"40"``).

    Raises
    ------
    DatasetError
        If the source does not exist or is not a directory/CSV, a class
        folder or the whole dataset has no images, manifest columns or files
        are missing, a path is listed twice, two class names differ only in
        case/spaces/punctuation, a BreakHis-like name does not parse, a
        magnification is not in the data, or the labels do not map into
        `scheme`. Nothing is read or computed before these checks pass.
    """
    root = Path(os.path.abspath(source))
    if breakhis_patients not in breakhis.PATIENT_GROUPINGS:
        raise DatasetError(f"unknown BreakHis patient grouping {breakhis_patients!r}; choose "
                           f"{', '.join(breakhis.PATIENT_GROUPINGS)}")
    if not root.exists():
        raise DatasetError(f"dataset source '{root}' does not exist")
    if root.is_dir():
        photos = _bach_photos(root)
        if photos is not None:
            table = _read_bach(photos)
        else:
            images = list_images(root)
            if any(breakhis.is_breakhis_like(p.name) for p in images):
                table = _breakhis_folder(root, images, breakhis_patients)
            else:
                table = _scan_folder(root)
    elif root.suffix.lower() == ".csv":
        table = _read_manifest(root, breakhis_patients)
    else:
        raise DatasetError(f"dataset source '{root}' must be a directory of class folders or a .csv manifest")

    try:
        check_class_names(dict(Counter(table["label"])), f"dataset '{root}'")
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    if magnification is not None:
        table = select_magnification(table, magnification, where=f"dataset '{root}'")
    found = []
    if duplicates:
        table, listing = group_duplicates(table, where=f"dataset '{root}'")
        found = [g["image_id"].tolist() for _, g in listing.groupby("sha256", sort=False)] if len(listing) else []
    if scheme is not None:
        try:
            resolve_scheme(scheme, table["label"], where=f"dataset '{root}'")
        except ValueError as exc:
            raise DatasetError(f"dataset '{root}': {exc}") from None
    columns = list(COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in table.columns]
    table = table.sort_values("image_id", ignore_index=True)[columns]
    table.attrs["duplicates"] = sorted(sorted(ids) for ids in found)
    return table


def select_magnification(table: pd.DataFrame, magnification, where: str = "the data set") -> pd.DataFrame:
    """The rows of `table` at the given magnification(s) (``40``, ``"100x"``, or a list).

    Raises
    ------
    DatasetError
        If the table has no ``magnification`` column, or a requested magnification is not in it.
    """
    wanted = magnification if isinstance(magnification, (list, tuple, set)) else [magnification]
    wanted = [_magnification(str(m)) for m in wanted]
    if "magnification" not in table.columns or not (table["magnification"] != "").any():
        raise DatasetError(f"{where} records no magnification (BreakHis file names or a manifest "
                           "'magnification' column give it): cannot select `magnification` "
                           f"{' '.join(wanted)}")
    present = sorted({m for m in table["magnification"] if m}, key=lambda m: (len(m), m))
    unknown = [m for m in wanted if m not in present]
    if unknown:
        raise DatasetError(f"{where}: magnification {', '.join(unknown)} is not in the data set "
                           f"(magnifications found: {', '.join(present)})")
    return table[table["magnification"].isin(wanted)].reset_index(drop=True)


def _magnification(text: str) -> str:
    text = text.strip().lower().removesuffix("x").strip()
    return str(int(text)) if text.isdigit() else text


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
        label = normalise_label(sub.name)
        if not images:
            if label in CANONICAL_LABELS:
                raise DatasetError(
                    f"dataset folder '{root}': class folder '{sub.name}' contains no images "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
            continue  # unrelated empty/non-image folder: harmless
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


def _bach_photos(root: Path) -> Path | None:
    """BACH's ``Photos`` folder when `root` is it or ``ICIAR2018_BACH_Challenge/`` above it."""
    for photos in (root, root / "Photos"):
        if (photos / BACH_GROUND_TRUTH).is_file():
            return photos
    return None


def _read_bach(photos: Path) -> pd.DataFrame:
    """BACH as distributed: ``Photos/<Class>/<file>.tif`` labelled by ``microscopy_ground_truth.csv``."""
    csv_path = photos / BACH_GROUND_TRUTH
    try:
        truth = pd.read_csv(csv_path, header=None, names=["file", "label"], dtype=str, keep_default_na=False,
                            skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"BACH ground truth '{csv_path}' is not a readable CSV file: {exc}") from None
    truth = truth[truth["file"].str.strip() != ""]
    if truth.empty:
        raise DatasetError(f"BACH ground truth '{csv_path}' lists no images")
    images = {p.name: p for p in list_images(photos)}
    rows, missing, misplaced = [], [], []
    for file, raw_label in zip(truth["file"].str.strip(), truth["label"].str.strip()):
        label = normalise_label(raw_label) if raw_label else ""
        path = images.get(file)
        if path is None:
            missing.append(file)
            continue
        if normalise_label(path.parent.name) != label:
            misplaced.append(f"{path.relative_to(photos).as_posix()} (labelled {raw_label!r})")
        rows.append((path.relative_to(photos).as_posix(), str(path), label))
    if missing:
        raise DatasetError(f"BACH ground truth '{csv_path}': {len(missing)} listed file(s) are not under "
                           f"'{photos}': {_format_list(missing)}")
    if misplaced:
        raise DatasetError(f"BACH ground truth '{csv_path}': {len(misplaced)} file(s) are in another class "
                           f"folder than their label: {_format_list(misplaced)}")
    unlisted = sorted(set(images) - set(truth["file"].str.strip()))
    if unlisted:
        log.warning("BACH folder '%s': %d image(s) are not in %s and are left out: %s", photos, len(unlisted),
                    BACH_GROUND_TRUTH, _format_list(unlisted))
    table = pd.DataFrame(rows, columns=["image_id", "path", "label"])
    table["group"] = table["image_id"]
    return table


def _parse_breakhis(names, where: str) -> list:
    parsed, bad = [], []
    for name in names:
        try:
            parsed.append(breakhis.parse_name(name))
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise DatasetError(f"{where}: {len(bad)} BreakHis file name(s) do not parse: {_format_list(bad)}")
    return parsed


def _breakhis_folder(root: Path, images: list[Path], patients: str) -> pd.DataFrame:
    """Any folder of BreakHis-named images (the distributed tree included): all must parse."""
    other = [p.relative_to(root).as_posix() for p in images if not breakhis.is_breakhis_like(p.name)]
    if other:
        raise DatasetError(f"dataset folder '{root}' holds BreakHis-named images (SOB_...) and {len(other)} "
                           f"other image(s): {_format_list(other)}; give the others in a manifest, or move them")
    parsed = _parse_breakhis([p.name for p in images], f"dataset folder '{root}'")
    return pd.DataFrame({
        "image_id": [p.relative_to(root).as_posix() for p in images],
        "path": [str(p) for p in images],
        "label": [n.subtype for n in parsed],
        "group": [n.patient(patients) for n in parsed],
        "magnification": [n.magnification for n in parsed],
    })


def _read_manifest(csv_path: Path, patients: str = breakhis.PATIENT_GROUPINGS[0]) -> pd.DataFrame:
    try:
        # dtype=str keeps ids such as "007"; empty cells become "".
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"manifest '{csv_path}' is not a readable CSV file: {exc}") from None
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    if "path" in raw.columns and "label" not in raw.columns and len(raw) and all(
            breakhis.is_breakhis_like(p.replace("\\", "/").rsplit("/", 1)[-1].strip()) for p in raw["path"]):
        raw["label"] = ""  # BreakHis names carry the label
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

    names = [p.replace("\\", "/").rsplit("/", 1)[-1] for p in paths]
    like = [breakhis.is_breakhis_like(n) for n in names]
    parsed = dict(zip([i for i, b in enumerate(like) if b],
                      _parse_breakhis([n for n, b in zip(names, like) if b], f"manifest '{csv_path}'")))
    labels = pd.Series([lab or (parsed[i].subtype if i in parsed else "") for i, lab in enumerate(labels)],
                       index=raw.index)

    blank = [str(n) for n, p, lab in zip(lines, paths, labels) if not p or not lab]
    if blank:
        raise DatasetError(f"manifest '{csv_path}': empty path or label on line(s) {_format_list(blank)}")
    canon = [normalise_label(lab) for lab in labels]

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
    groups = pd.Series([g or (parsed[i].patient(patients) if i in parsed else "") for i, g in enumerate(groups)])
    table["group"] = groups.where(groups != "", table["image_id"]).to_numpy()
    if "magnification" in raw.columns or parsed:
        given = raw["magnification"].str.strip() if "magnification" in raw.columns else pd.Series("", index=raw.index)
        table["magnification"] = [_magnification(m) if m else (parsed[i].magnification if i in parsed else "")
                                  for i, m in enumerate(given)]
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
