"""The feature store: one joblib file per image in a directory keyed by the config hash.

Layout of a store root given with ``--out``::

    ROOT/<backbone>-<hash12>/config.json       the full ExtractionConfig + its hash
    ROOT/<backbone>-<hash12>/images/*.joblib    one record per finished image
    ROOT/<backbone>-<hash12>/skipped.json       images the last run could not read, and why
    ROOT/<backbone>-<hash12>/dataset.json       the image ids of the last extraction's data set
    ROOT/<backbone>-<hash12>/.lock              held by the one process writing the store

Every record is written to a temporary file, synced and renamed, so a killed run (or a power
loss) leaves either a whole record or none; a rerun skips the images whose record exists for
the same source file.  Readers use only the records of the last extraction's data set
(``dataset.json``): an image removed or renamed since keeps its old record on disk, but it is
not read.  Records are read by a restricted unpickler that admits only what a record holds
(a dict of strings, numbers, ``None`` and numeric arrays), so a store from someone else cannot
run code when read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler

from data.files import atomic_write, atomic_write_text, remove_temporaries, version_differences
from features.config import ExtractionConfig
from features.pooling import mean_of_instances

log = logging.getLogger(__name__)

META_COLUMNS = ("image_id", "label", "group", "aug", "path", "stain_note", "magnification", "source_sha256")
DATASET_FILE = "dataset.json"
LOCK_FILE = ".lock"


class StoreError(ValueError):
    """A store directory is missing, ambiguous, inconsistent or damaged."""


class UnsafeRecordError(StoreError):
    """A record holds something other than data (a pickled global outside the allow-list)."""


@dataclass
class FeatureTable:
    """Features with one row per (image, augmentation).

    Attributes
    ----------
    meta : DataFrame with columns ``image_id, label, group, aug, path, stain_note, magnification,
        source_sha256``; ``magnification`` is ``""`` when the data set has none (and in
        stores written before it was recorded).
    X : float32 array ``(len(meta), n_features)``; row ``i`` belongs to ``meta.iloc[i]``.  In
        an instance store, the mean of the row's instances.
    config : the extraction config record (``config.json``), including ``config_hash``.
    instances : float32 array ``(len(meta), n_instances, n_features)`` of an instance store
        (config ``instances`` other than ``"none"``), else ``None``.
    """

    meta: pd.DataFrame
    X: np.ndarray
    config: dict
    instances: np.ndarray | None = None

    def rows(self, keep) -> "FeatureTable":
        """The table of the rows ``keep`` (a boolean mask or indices), instances included."""
        keep = np.asarray(keep)
        return type(self)(meta=self.meta[keep].reset_index(drop=True) if keep.dtype == bool
                          else self.meta.iloc[keep].reset_index(drop=True),
                          X=np.asarray(self.X)[keep], config=self.config,
                          instances=None if self.instances is None else self.instances[keep])


# ---------------------------------------------------------------------------------------
# reading records without running code
# ---------------------------------------------------------------------------------------

_RECORD_FIELDS = {"image_id": str, "label": str, "group": str, "path": str, "source_sha256": str}
_ALLOWED_GLOBALS = {
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): NumpyArrayWrapper,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RecordUnpickler(NumpyUnpickler):
    """joblib's unpickler, admitting only the globals of a numeric array (``joblib.load``
    takes no unpickler, so the file is read with this subclass of joblib's own)."""

    dispatch = NumpyUnpickler.dispatch.copy()

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafeRecordError(
            f"{self.filename}: refusing to load '{module}.{name}': a feature record holds only "
            "strings, numbers and numeric arrays; this file was crafted or damaged, delete it"
        )

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, NumpyArrayWrapper):
            # Check before joblib reads the array: object arrays are a nested pickle.
            dtype = state.get("dtype") if isinstance(state, dict) else None
            if (not isinstance(dtype, np.dtype) or dtype.kind not in "biuf"
                    or state.get("subclass") is not np.ndarray):
                raise UnsafeRecordError(f"{self.filename}: holds an array of type {dtype!r}; a feature "
                                        "record holds numeric arrays only, delete it")
        NumpyUnpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def read_record(path: Path | str) -> dict:
    """Read one ``images/*.joblib`` record, admitting only data (see the module docstring).

    Raises
    ------
    UnsafeRecordError
        The file asks for code (any global other than a numeric array's).
    StoreError
        The file is truncated, corrupt or not a record; the message names it.
    """
    path = Path(path)
    remedy = "delete it and rerun pipeline.extract to redo the image"
    try:
        with open(path, "rb") as handle:
            if handle.read(1) != pickle.PROTO:  # joblib.dump without compression, as written here
                raise StoreError(f"{path} is not a feature record (not an uncompressed joblib file); {remedy}")
            handle.seek(0)
            record = _RecordUnpickler(str(path), handle, ensure_native_byte_order=True).load()
    except StoreError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, ...: a truncated or damaged file
        raise StoreError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {remedy}") from None
    problem = _record_problem(record)
    if problem:
        raise StoreError(f"{path} is not a valid feature record ({problem}); {remedy}")
    return record


def _record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a dict"
    for key, kind in _RECORD_FIELDS.items():
        if not isinstance(record.get(key), kind):
            return f"field {key!r} is missing or not a {kind.__name__}"
    if not (record.get("stain_note") is None or isinstance(record["stain_note"], str)):
        return "field 'stain_note' is not a string"
    if not isinstance(record.get("magnification", ""), str):  # optional: older stores lack it
        return "field 'magnification' is not a string"
    features = record.get("features")
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        return "field 'features' is not a 2-d array"
    instances = record.get("instances")  # instance stores only
    if instances is not None and (not isinstance(instances, np.ndarray) or instances.ndim != 3
                                  or instances.shape[0] != features.shape[0]
                                  or instances.shape[2] != features.shape[1]):
        return "field 'instances' is not an (augmentations, instances, features) array matching 'features'"
    return None


def read_config(store_dir: Path | str) -> dict:
    """``config.json`` of a store, with an error naming the file and the remedy."""
    path = Path(store_dir) / "config.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is damaged ({exc}); delete the store directory {path.parent} "
                         "and extract again") from None
    if not isinstance(record, dict) or "config_hash" not in record:
        raise StoreError(f"{path} is not a feature-store config (no config_hash); delete the store "
                         f"directory {path.parent} and extract again")
    return record


def _record_name(image_id: str) -> str:
    # A readable part for people plus a hash, so ids that sanitise alike never collide.
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:]
    digest = hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:12]
    return f"{digest}_{readable}.joblib"


class FeatureStore:
    """Writer/reader for one config's directory inside a store root.

    A writer calls :meth:`open` (or uses the store as a context manager after it), which takes
    the store's lock for the whole run: a second process writing the same store stops with a
    :class:`StoreError` instead of racing it.  Dask workers write records without the lock,
    under the client's.
    """

    def __init__(self, root: Path | str, config: ExtractionConfig):
        self.config = config
        self.path = Path(root) / config.store_name
        self.images_dir = self.path / "images"
        self._lock = None
        self._created = False

    def open(self) -> "FeatureStore":
        """Create the directory (or check an existing one has the same config) and lock it."""
        self._created = not self.path.exists()
        self.images_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(
                f"another process is extracting into {self.path} (it holds {self.path / LOCK_FILE}); "
                "wait for it to finish, then rerun: finished images are kept"
            ) from None
        self._lock = lock
        try:
            record = {**self.config.to_dict(), "config_hash": self.config.config_hash}
            config_file = self.path / "config.json"
            if config_file.exists():
                existing = read_config(self.path)
                if existing.get("config_hash") != self.config.config_hash:
                    raise StoreError(f"{config_file} belongs to another config; refusing to mix")
                # The store keeps the versions it was started with; a resume under others is said.
                record["versions"] = existing.get("versions", {})
                if changed := version_differences(record["versions"], self.config.versions):
                    log.warning("%s was started with other library versions (%s): features of the images "
                                "extracted now may differ from the others in their last bits",
                                self.path, ", ".join(changed))
            atomic_write_text(config_file, json.dumps(record, indent=2))
            remove_temporaries(self.images_dir)  # left by a killed run; we hold the lock
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the lock taken by :meth:`open`."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is not None and self._created and not any(self.images_dir.glob("*.joblib")):
            # A run that failed before its first record (bad weights file, ...) leaves no empty
            # store behind to make "--features ROOT" ambiguous.
            shutil.rmtree(self.path, ignore_errors=True)

    def write_dataset(self, image_ids) -> None:
        """Record the image ids of this extraction's data set: readers use only these."""
        ids = sorted(dict.fromkeys(map(str, image_ids)))
        atomic_write_text(self.path / DATASET_FILE, json.dumps({"image_ids": ids}, indent=1))

    def record_path(self, image_id: str) -> Path:
        return self.images_dir / _record_name(image_id)

    def is_done(self, image_id: str, source_sha256: str) -> bool:
        """True when a record exists for this image made from the same source file."""
        path = self.record_path(image_id)
        if not path.exists():
            return False
        try:
            record = read_record(path)
        except UnsafeRecordError:
            raise
        except StoreError as exc:  # truncated or damaged: redo the image
            log.warning("%s; extracting the image again", exc)
            return False
        return record.get("source_sha256") == source_sha256

    def read(self, image_id: str) -> dict:
        """The finished record of ``image_id`` (see :func:`read_record`)."""
        return read_record(self.record_path(image_id))

    def update_meta(self, image_id: str, label: str, group: str, path: str, magnification: str = "") -> None:
        """Refresh label/group/path/magnification of a finished record (they do not change features)."""
        record = self.read(image_id)
        new = (label, group, path, magnification)
        if (record["label"], record["group"], record["path"], record.get("magnification", "")) != new:
            record.update(label=label, group=group, path=path, magnification=magnification)
            self.write(record)

    def write(self, record: dict) -> None:
        """Atomically write one image's record (see :func:`make_record`)."""
        target = self.record_path(record["image_id"])
        atomic_write(target, lambda tmp: joblib.dump(record, tmp))

    def write_skipped(self, skipped: list[dict]) -> None:
        target = self.path / "skipped.json"
        atomic_write_text(target, json.dumps(skipped, indent=2))


def make_record(*, image_id, label, group, path, source_sha256, features, stain_note, magnification="") -> dict:
    """One image's stored record; ``features`` is ``(n_augmentations, n_features)``, or
    ``(n_augmentations, n_instances, n_features)`` for an instance store: the record then keeps
    them as ``instances`` and their mean as ``features`` (what every vector classifier reads)."""
    features = np.asarray(features, dtype=np.float32)
    # Plain str: a numpy string scalar (a label taken from an array) pickles as a numpy global,
    # which read_record refuses, so the record would be written but never read.
    record = {
        "image_id": str(image_id),
        "label": str(label),
        "group": str(group),
        "path": str(path),
        "source_sha256": str(source_sha256),
        "features": features,
        "stain_note": None if stain_note is None else str(stain_note),
        "magnification": str(magnification),
    }
    if features.ndim == 3:
        record.update(features=mean_of_instances(features), instances=features)
    return record


def resolve_store_dir(path: Path | str) -> Path:
    """Accept a config directory, or a root holding exactly one config directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not path.is_dir():
        raise StoreError(f"feature store not found: {path}")
    candidates = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise StoreError(f"{path} holds no feature store (no config.json); run pipeline.extract")
    names = ", ".join(str(p) for p in candidates)
    raise StoreError(f"{path} holds several feature stores; name one of: {names}")


def store_record_files(store_dir: Path | str) -> tuple[list[Path], int]:
    """The record files of the last extraction's data set, and how many others are ignored.

    Others are records of images no longer in the data set (removed or renamed since).  A
    store written before ``dataset.json`` existed uses all its records.  Temporary files of a
    running or killed extract (``.tmp-*``) are never records.
    """
    store_dir = Path(store_dir)
    images = store_dir / "images"
    present = {p.name: p for p in images.glob("*.joblib") if not p.name.startswith(".")}
    listing = store_dir / DATASET_FILE
    if not listing.is_file():
        return [present[n] for n in sorted(present)], 0
    try:
        ids = json.loads(listing.read_text(encoding="utf-8"))["image_ids"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{listing} is damaged ({exc}); rerun pipeline.extract on the data set to "
                         "rewrite it (finished images are kept)") from None
    wanted = {_record_name(str(i)) for i in ids}
    used = [present[n] for n in sorted(wanted & set(present))]
    return used, len(set(present) - wanted)


def load_store(path: Path | str) -> FeatureTable:
    """Load the finished images of the last extraction's data set as a :class:`FeatureTable`,
    sorted by image id; records of other images are ignored, with a warning saying how many."""
    store_dir = resolve_store_dir(path)
    config = read_config(store_dir)
    files, ignored = store_record_files(store_dir)
    if ignored:
        log.warning("%s: ignored %d record(s) of images not in the last extraction's data set "
                    "(removed or renamed since)", store_dir, ignored)
    records = [read_record(p) for p in files]
    if not records:
        raise StoreError(f"feature store {store_dir} holds no finished image yet")
    records.sort(key=lambda r: r["image_id"])
    rows, blocks = [], []
    for r in records:
        n_aug = r["features"].shape[0]
        for aug in range(n_aug):
            rows.append((r["image_id"], r["label"], r["group"], aug, r["path"], r["stain_note"],
                         r.get("magnification", ""), r["source_sha256"]))
        blocks.append(r["features"])
    meta = pd.DataFrame(rows, columns=list(META_COLUMNS))
    return FeatureTable(meta=meta, X=np.concatenate(blocks).astype(np.float32), config=config,
                        instances=_stacked_instances(records, config, store_dir))


def _stacked_instances(records: list, config: dict, store_dir: Path) -> np.ndarray | None:
    """The instances of an instance store's records, stacked like their features; ``None`` for
    a store of one vector per augmentation (every store made before instances existed)."""
    if config.get("instances", "none") == "none":
        return None
    lacking = [r["image_id"] for r in records if r.get("instances") is None]
    if lacking:
        raise StoreError(f"{store_dir} is an instance store ({config['instances']}) but the records of "
                         f"{len(lacking)} image(s) hold no instances (first: {lacking[0]}); delete them and "
                         "rerun pipeline.extract")
    shapes = {r["instances"].shape[1:] for r in records}
    if len(shapes) > 1:
        raise StoreError(f"{store_dir}: records hold instances of different shapes {sorted(shapes)}; the store "
                         "is inconsistent, extract it again")
    return np.concatenate([r["instances"] for r in records]).astype(np.float32)


def exclude_images(table: FeatureTable, image_ids) -> FeatureTable:
    """``table`` without the rows of ``image_ids`` (e.g. images held out for a demo).

    Raises :class:`StoreError` naming any id the store does not hold, so a typo does not
    silently train on the image it meant to hold out.
    """
    image_ids = list(dict.fromkeys(image_ids))
    missing = sorted(set(image_ids) - set(table.meta["image_id"]))
    if missing:
        raise StoreError(f"cannot exclude images the store does not hold: {', '.join(missing)}")
    return table.rows(~table.meta["image_id"].isin(image_ids).to_numpy())
