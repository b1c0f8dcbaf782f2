"""The one protocol every model kind speaks, and :func:`load_model` for any model directory.

A model kind (deep features + classifier, two-stage CNN, patch ConvNet) is a class with the
methods of :class:`Model`; ``pipeline.predict``, ``pipeline.heatmap`` and the notebook go through
these methods only.  Adding a kind is one class and one :data:`MODEL_KINDS` entry (see
docs/architecture.md).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Model(Protocol):
    """What every trained model offers.

    Attributes
    ----------
    kind : str
        Key of :data:`MODEL_KINDS`.
    classes : tuple of str
        The classes the model predicts, in the order of its probability columns.
    """

    kind: str

    @property
    def classes(self) -> tuple: ...

    def fit(self, data, **options) -> "Model":
        """Train on a data set (each kind's own: feature stores, images, annotated patches)."""

    def predict_images(self, inputs, **options):
        """Image files or folders -> :class:`classifiers.predictions.PredictionResult`, the one
        per-image table; unreadable inputs are skipped with their reason."""

    def heatmaps(self, *, window: int | None = None, step: int | None = None, **options):
        """A maker of class-probability maps over sliding windows: ``prepare(paths)`` once,
        then ``maker(path, image) -> (image as the model sees it, Heatmap)``."""

    def save(self, directory, **options) -> Path:
        """Write the model directory (atomically) and return its path."""

    @classmethod
    def load(cls, directory) -> "Model":
        """Read a model directory written by :meth:`save`."""


@dataclass(frozen=True)
class ModelKind:
    """How a model directory records its kind: ``record[field] == value`` in ``record_file``."""

    record_file: str
    field: str
    value: str
    cls: str  # "module:Class", imported on use (TensorFlow only for the kinds that need it)

    def model_class(self) -> type:
        module, name = self.cls.split(":")
        return getattr(importlib.import_module(module), name)


#: Every model kind.  The values are those the formats have always written (model.json
#: ``kind``, patch_cnn.json ``kind``, the two-stage config.json ``model``), so every existing
#: model directory loads unchanged.
MODEL_KINDS = {
    "features": ModelKind("model.json", "kind", "breast-histology-pipeline feature model",
                          "classifiers.feature.model:FeatureModel"),
    "patch_cnn": ModelKind("patch_cnn.json", "kind", "breast-histology-pipeline patch cnn",
                           "classifiers.patch_cnn.model:PatchCNN"),
    "two_stage": ModelKind("config.json", "model", "two_stage", "classifiers.two_stage.model:TwoStageModel"),
}


def model_kind(directory) -> str:
    """The key of :data:`MODEL_KINDS` that ``directory`` records.

    Raises
    ------
    FileNotFoundError
        No such directory.
    ValueError
        No record file of any kind says what the directory holds.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    for name, kind in MODEL_KINDS.items():
        path = directory / kind.record_file
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(record, dict) and record.get(kind.field) == kind.value:
            return name
    if (directory / MODEL_KINDS["features"].record_file).is_file():
        return "features"  # a damaged or other-version model.json: its loader says what is wrong
    raise ValueError(f"{directory} is not a model directory of this package (no model.json, patch_cnn.json "
                     "or two-stage config.json); make one with pipeline.train, pipeline.patch_cnn train or "
                     "pipeline.two_stage train")


def load_model(directory) -> Model:
    """Load any model directory of this package, as the kind it records (:data:`MODEL_KINDS`)."""
    return MODEL_KINDS[model_kind(directory)].model_class().load(directory)
