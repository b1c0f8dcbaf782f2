"""Shared pytest fixtures.

Fixtures are grouped by the package they serve; add new groups below with
their own section header. Session-scoped fixtures are shared by all tests
and must be treated as read-only (copy them to ``tmp_path`` to modify).
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
