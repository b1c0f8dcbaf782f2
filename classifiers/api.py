"""The Python API: from feature stores to a cross-validated report, a model, predictions, heatmaps.

::

    from features import extract_features
    from classifiers import cross_validate, heatmap, load_model, predict_images, train, write_report

    store = extract_features("images/", "runs/features", augmentations=2, crops=2).store_path
    result = cross_validate([store], scheme="bach4", classifiers=["logreg"])
    write_report(result, "runs/report")
    model = train([store], "runs/model", classifier="logreg")
    table = predict_images(load_model("runs/model"), ["new/a.png"]).table
    hm = heatmap(model, "new/a.png", out="runs/heatmaps")

Each call is what a ``pipeline`` job runs (same defaults, same files); the jobs add argument
parsing and printing.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from classifiers.evaluation.cross_validation import FUSION_CHOICES, CVConfig, CVResult, run_cross_validation
from classifiers.evaluation.cv_dataset import CVDataset, build_dataset


def load_features(stores: Sequence, scheme: str = "auto", *, regroup: Sequence = (), magnification=None) -> CVDataset:
    """Feature stores (directories or loaded tables) aligned into one data set in ``scheme``
    (``auto``, ``classes``, a built-in name or a mapping file; see
    :func:`~classifiers.evaluation.cv_dataset.build_dataset` for ``regroup`` and ``magnification``)."""
    from features.store import load_store

    return build_dataset([load_store(s) if isinstance(s, (str, os.PathLike)) else s for s in stores], scheme,
                         regroup=regroup, magnification=magnification)


def cross_validate(stores: Sequence, *, scheme: str = "auto", n_folds: int = 6, seed: int = 0,
                   classifiers: Sequence[str] = ("xgboost", "logreg"), fusion: Sequence[str] = FUSION_CHOICES,
                   regroup: Sequence = (), magnification=None, **options) -> CVResult:
    """Grouped, stratified ``n_folds``-fold CV of each classifier on the stores (``pipeline.cv_report``).

    ``scheme``: ``auto`` (bach4 for BACH, benign/malignant for BreakHis, else the classes as
    found), ``classes``, a built-in name or a mapping file; ``regroup``, ``magnification``: as
    :func:`load_features`.  ``options``: the other
    :class:`~classifiers.evaluation.cross_validation.CVConfig` fields (``n_jobs``, ``device``,
    ``tune``).  Write the report with :func:`write_report`.
    """
    config = CVConfig(scheme=scheme, n_folds=n_folds, classifiers=tuple(classifiers), fusion=tuple(fusion),
                      seed=seed, **options)
    config.validate()
    return run_cross_validation(load_features(stores, scheme, regroup=regroup, magnification=magnification),
                                config)


def train(stores: Sequence, out=None, *, scheme: str = "auto", classifier: str = "xgboost",
          fusion: str = "concat", seed: int = 0, overwrite: bool = False, regroup: Sequence = (),
          magnification=None, **options):
    """The final :class:`~classifiers.feature.model.FeatureModel` on every image (``pipeline.train``).

    ``out``: save it there (refused before training when it holds anything but a model, or a
    model without ``overwrite``).  ``options``: the other
    :class:`~classifiers.feature.model_io.TrainConfig` fields (``n_jobs``, ``device``, ``tune``).
    """
    from classifiers.feature.model import FeatureModel
    from classifiers.feature.model_io import TrainConfig, check_model_out

    model = FeatureModel(TrainConfig(scheme=scheme, classifier=classifier, fusion=fusion, seed=seed, **options))
    model.config.validate()
    if out is not None:
        check_model_out(out, overwrite=overwrite)
    model.fit(load_features(stores, scheme, regroup=regroup, magnification=magnification))
    if out is not None:
        model.save(out, overwrite=overwrite)
    return model


def write_report(result: CVResult, out) -> dict:
    """The report files of a :func:`cross_validate` result in ``out`` (:func:`classifiers.evaluation.report.write_report`;
    imported on use: it loads matplotlib)."""
    from classifiers.evaluation.report import write_report as write

    return write(result, out)


def _model(model):
    from classifiers.protocol import load_model

    return load_model(model) if isinstance(model, (str, os.PathLike)) else model


def predict_images(model, inputs, **options):
    """Image files or folders -> :class:`~classifiers.predictions.PredictionResult` (``pipeline.predict``).

    ``model``: any :class:`~classifiers.protocol.Model` or model directory; ``options`` as its
    ``predict_images`` takes them (``weights``, ``batch_size``, ``progress``).
    """
    return _model(model).predict_images(inputs, **options)


def heatmap(model, image, out=None, *, window: int | None = None, step: int | None = None,
            classes: Sequence[str] | None = None, **options):
    """The :class:`~classifiers.heatmaps.Heatmap` of one image file (``pipeline.heatmap``).

    ``out``: also write ``<stem>.<class>.npy``, ``<stem>.heatmap.json`` and the overlay
    ``<stem>.heatmap.png`` there.  ``options`` as :func:`classifiers.model_heatmaps.open_heatmaps`
    takes them (``exact``, ``whole_image``, ``weights``, ``batch_size``).
    """
    from classifiers.heatmaps import render_overlay, save_heatmap
    from classifiers.model_heatmaps import open_heatmaps
    from data.io import read_image

    path = str(image)
    maker = open_heatmaps(_model(model), window=window, step=step, classes=classes, **options)
    raw = read_image(path)
    maker.prepare([path])
    shown, result = maker(path, raw)
    if out is not None:
        stem = Path(path).stem
        save_heatmap(result, out, stem, image=path)
        render_overlay(shown, result, Path(out) / f"{stem}.heatmap.png", classes=classes, title=Path(path).name)
    return result
