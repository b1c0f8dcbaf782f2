"""Shared pytest fixtures.

Fixtures are grouped by the package they serve; add new groups below with
their own section header. Session-scoped fixtures are shared by all tests
and must be treated as read-only (copy them to ``tmp_path`` to modify).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data.labels import class_names
from data.synthetic import write_dataset

# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------

#: Parameters of the ``synthetic_dir`` dataset, for tests that check counts.
SYNTHETIC_N_PER_CLASS = 4
SYNTHETIC_SIZE = (192, 256)
SYNTHETIC_SEED = 0


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small read-only synthetic bach4 dataset.

    ``<dir>/<label>/<label>_<i>.png`` for the four bach4 classes,
    ``SYNTHETIC_N_PER_CLASS`` (4) RGB images of ``SYNTHETIC_SIZE``
    (192 x 256) each, seed ``SYNTHETIC_SEED``, plus ``<dir>/manifest.csv``
    (``path,label,group``; two images per patient group). Load it with
    ``data.load_dataset(synthetic_dir)`` or ``.../manifest.csv``.
    """
    return write_dataset(
        tmp_path_factory.mktemp("synthetic"),
        n_per_class=SYNTHETIC_N_PER_CLASS,
        size=SYNTHETIC_SIZE,
        seed=SYNTHETIC_SEED,
        fmt="png",
        scheme="bach4",
        groups=True,
    )


# --------------------------------------------------------------------------
# features: a tiny data set for end-to-end extraction with random-init backbones
# --------------------------------------------------------------------------

#: Extraction options small enough for CPU tests (2 augmentations x 2 crops of 48 px).
TINY_PROTOCOL = dict(augmentations=2, crops=2, crop_size=48, scale=1.0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only synthetic bach4 folder: 2 images of 64 x 80 per class, seed 0."""
    return write_dataset(tmp_path_factory.mktemp("tiny"), n_per_class=2, size=(64, 80), seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_dir: Path):
    """``load_dataset(tiny_dir)``: 8 rows."""
    from data.datasets import load_dataset

    return load_dataset(tiny_dir)


# --------------------------------------------------------------------------
# classifiers: the model protocol
# --------------------------------------------------------------------------


def prediction_columns(classes) -> list:
    """The columns of ``predictions.csv`` (pipeline.predict) for a model of ``classes``, any kind."""
    return (["image", "prediction", "prediction_mean_proba", "n_aug"] + [f"proba_{c}" for c in classes]
            + [f"votes_{c}" for c in classes] + ["stain_note", "confidence", "low_confidence"])


# --------------------------------------------------------------------------
# classifiers: synthetic feature tables and stores (no images, no backbone)
# --------------------------------------------------------------------------

BACH4 = class_names("bach4")


def synthetic_table(
    n_per_class=(12, 12, 12, 12),
    *,
    classes=BACH4,
    n_aug=4,
    n_features=8,
    signal=4.0,
    patients=None,
    seed=0,
    backbone="synthetic",
):
    """A FeatureTable of synthetic features: class ``i`` shifts feature ``i`` by ``signal``.

    Each image has its own random centre (image-to-image variation) and its
    augmentations scatter around it.  ``patients`` maps image index -> group;
    by default each image is its own group.  Rows are shuffled so that the
    code cannot rely on the store's order.
    """
    import numpy as np
    import pandas as pd
    from features.store import FeatureTable

    rng = np.random.default_rng(seed)
    rows, X = [], []
    index = 0
    for ci, (cls, n) in enumerate(zip(classes, n_per_class)):
        for i in range(n):
            image_id = f"{cls}-{i:03d}"
            group = patients(index) if patients else image_id
            centre = rng.normal(scale=0.5, size=n_features)
            centre[ci % n_features] += signal
            for aug in range(n_aug):
                rows.append((image_id, cls, group, aug, f"/data/{image_id}.tif"))
                X.append(centre + rng.normal(scale=0.3, size=n_features))
            index += 1
    meta = pd.DataFrame(rows, columns=["image_id", "label", "group", "aug", "path"])
    order = rng.permutation(len(meta))
    return FeatureTable(
        meta=meta.iloc[order].reset_index(drop=True),
        X=np.asarray(X, dtype=np.float32)[order],
        config={"backbone": backbone, "config_hash": f"{seed:064x}"},
    )


def write_store(root, table, backbone, **options) -> Path:
    """Write a :func:`synthetic_table` as a feature store of ``backbone`` under ``root``; its path.

    ``options`` are further ``ExtractionConfig`` fields (e.g. a preset's mode and scale)."""
    import hashlib

    from features import store as store_mod
    from features.config import ExtractionConfig

    n_aug = int(table.meta.groupby("image_id").size().iloc[0])
    store = store_mod.FeatureStore(root, ExtractionConfig(backbone=backbone, weights="none", augmentations=n_aug,
                                                          **options)).open()
    for image_id, rows in table.meta.groupby("image_id"):
        rows = rows.sort_values("aug")
        first = rows.iloc[0]
        store.write(
            store_mod.make_record(
                image_id=image_id, label=first["label"], group=first["group"], path=first["path"],
                source_sha256=hashlib.sha256(image_id.encode()).hexdigest(),  # distinct images
                features=table.X[rows.index.to_numpy()], stain_note="",
            )
        )
    return store.path


def extracted_table(n_per_class=6, n_aug=2, seed=0):
    """A FeatureTable as extraction makes it (a full ``ExtractionConfig``, ``stain_note``, image
    ids ``<class>/<i>.png``) of 4 separable synthetic features, bach4 classes: for training and
    saving models."""
    import numpy as np
    import pandas as pd
    from features.config import ExtractionConfig
    from features.store import FeatureTable

    rng = np.random.default_rng(seed)
    rows, X = [], []
    for ci, cls in enumerate(BACH4):
        for i in range(n_per_class):
            centre = rng.normal(size=4)
            centre[ci] += 3
            for aug in range(n_aug):
                rows.append((f"{cls}/{i}.png", cls, f"{cls}{i}", aug, f"/d/{cls}/{i}.png", None))
                X.append(centre + rng.normal(scale=0.2, size=4))
    meta = pd.DataFrame(rows, columns=["image_id", "label", "group", "aug", "path", "stain_note"])
    config = ExtractionConfig(weights="none")
    return FeatureTable(meta=meta, X=np.asarray(X, np.float32),
                        config={**config.to_dict(), "config_hash": config.config_hash})
