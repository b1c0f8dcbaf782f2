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
