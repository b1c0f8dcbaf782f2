"""The feature store: one joblib file per image in a directory keyed by the config hash.

Layout of a store root given with ``--out``::

    ROOT/<backbone>-<hash12>/config.json       the full ExtractionConfig + its hash
    ROOT/<backbone>-<hash12>/images/*.joblib    one record per finished image
    ROOT/<backbone>-<hash12>/skipped.json       images the last run could not read, and why

Every record is written to a temporary file and renamed, so a killed run leaves either a
whole record or none; a rerun skips the images whose record exists for the same source file.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from data.files import atomic_write, atomic_write_text, remove_temporaries
from features.config import ExtractionConfig

META_COLUMNS = ("image_id", "label", "group", "aug", "path", "stain_note")


class StoreError(ValueError):
    """A store directory is missing, ambiguous or inconsistent."""


@dataclass
class FeatureTable:
    """Features with one row per (image, augmentation).

    Attributes
    ----------
    meta : DataFrame with columns ``image_id, label, group, aug, path, stain_note``.
    X : float32 array ``(len(meta), n_features)``; row ``i`` belongs to ``meta.iloc[i]``.
    config : the extraction config record (``config.json``), including ``config_hash``.
    """

    meta: pd.DataFrame
    X: np.ndarray
    config: dict


def _record_name(image_id: str) -> str:
    # A readable part for people plus a hash, so ids that sanitise alike never collide.
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:]
    digest = hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:12]
    return f"{digest}_{readable}.joblib"


class FeatureStore:
    """Writer/reader for one config's directory inside a store root."""

    def __init__(self, root: Path | str, config: ExtractionConfig):
        self.config = config
        self.path = Path(root) / config.store_name
        self.images_dir = self.path / "images"

    def open(self) -> "FeatureStore":
        """Create the directory (or check an existing one has the same config)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.config.to_dict(), "config_hash": self.config.config_hash}
        config_file = self.path / "config.json"
        if config_file.exists():
            existing = json.loads(config_file.read_text())
            if existing.get("config_hash") != self.config.config_hash:
                raise StoreError(f"{config_file} belongs to another config; refusing to mix")
        atomic_write_text(config_file, json.dumps(record, indent=2))
        remove_temporaries(self.images_dir)  # left by a killed run
        return self

    def record_path(self, image_id: str) -> Path:
        return self.images_dir / _record_name(image_id)

    def is_done(self, image_id: str, source_sha256: str) -> bool:
        """True when a record exists for this image made from the same source file."""
        path = self.record_path(image_id)
        if not path.exists():
            return False
        try:
            record = joblib.load(path)
        except Exception:  # unreadable record: redo the image
            return False
        return record.get("source_sha256") == source_sha256

    def update_meta(self, image_id: str, label: str, group: str, path: str) -> None:
        """Refresh label/group/path of a finished record (they do not change features)."""
        record = joblib.load(self.record_path(image_id))
        if (record["label"], record["group"], record["path"]) != (label, group, path):
            record.update(label=label, group=group, path=path)
            self.write(record)

    def write(self, record: dict) -> None:
        """Atomically write one image's record (see :func:`make_record`)."""
        target = self.record_path(record["image_id"])
        atomic_write(target, lambda tmp: joblib.dump(record, tmp))

    def write_skipped(self, skipped: list[dict]) -> None:
        target = self.path / "skipped.json"
        atomic_write_text(target, json.dumps(skipped, indent=2))


def make_record(*, image_id, label, group, path, source_sha256, features, stain_note) -> dict:
    """One image's stored record; ``features`` is ``(n_augmentations, n_features)``."""
    return {
        "image_id": image_id,
        "label": label,
        "group": group,
        "path": str(path),
        "source_sha256": source_sha256,
        "features": np.asarray(features, dtype=np.float32),
        "stain_note": stain_note,
    }


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


def load_store(path: Path | str) -> FeatureTable:
    """Load every finished image of a store as a :class:`FeatureTable`, sorted by image id."""
    store_dir = resolve_store_dir(path)
    config = json.loads((store_dir / "config.json").read_text())
    records = [joblib.load(p) for p in sorted((store_dir / "images").glob("*.joblib"))]
    if not records:
        raise StoreError(f"feature store {store_dir} holds no finished image yet")
    records.sort(key=lambda r: r["image_id"])
    rows, blocks = [], []
    for r in records:
        n_aug = r["features"].shape[0]
        for aug in range(n_aug):
            rows.append((r["image_id"], r["label"], r["group"], aug, r["path"], r["stain_note"]))
        blocks.append(r["features"])
    meta = pd.DataFrame(rows, columns=list(META_COLUMNS))
    return FeatureTable(meta=meta, X=np.concatenate(blocks).astype(np.float32), config=config)


def exclude_images(table: FeatureTable, image_ids) -> FeatureTable:
    """``table`` without the rows of ``image_ids`` (e.g. images held out for a demo).

    Raises :class:`StoreError` naming any id the store does not hold, so a typo does not
    silently train on the image it meant to hold out.
    """
    image_ids = list(dict.fromkeys(image_ids))
    missing = sorted(set(image_ids) - set(table.meta["image_id"]))
    if missing:
        raise StoreError(f"cannot exclude images the store does not hold: {', '.join(missing)}")
    keep = ~table.meta["image_id"].isin(image_ids).to_numpy()
    return FeatureTable(meta=table.meta[keep].reset_index(drop=True), X=table.X[keep],
                        config=table.config)
