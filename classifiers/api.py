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
from classifiers.evaluation.cv_dataset import CVDataset, InputDataError, build_dataset


def load_features(stores: Sequence, scheme: str = "auto", *, regroup: Sequence = (), magnification=None) -> CVDataset:
    """Feature stores (directories or loaded tables) aligned into one data set in ``scheme``
    (``auto``, ``classes``, a built-in name or a mapping file; see
    :func:`~classifiers.evaluation.cv_dataset.build_dataset` for ``regroup`` and ``magnification``)."""
    from features.store import load_store

    return build_dataset([load_store(s) if isinstance(s, (str, os.PathLike)) else s for s in stores], scheme,
                         regroup=regroup, magnification=magnification)


def cross_validate(stores: Sequence = (), *, scheme: str = "auto", n_folds: int = 6, seed: int = 0,
                   classifiers: Sequence[str] = ("xgboost", "logreg"), fusion: Sequence[str] = FUSION_CHOICES,
                   regroup: Sequence = (), magnification=None, data=None, two_stage: str | dict | None = None,
                   two_stage_dir=None, two_stage_stain: str = "none", **options) -> CVResult:
    """Grouped, stratified ``n_folds``-fold CV of each classifier on the stores (``pipeline.cv_report``).

    ``scheme``: ``auto`` (bach4 for BACH, benign/malignant for BreakHis, else the classes as
    found), ``classes``, a built-in name or a mapping file; ``regroup``, ``magnification``: as
    :func:`load_features`.  ``options``: the other
    :class:`~classifiers.evaluation.cross_validation.CVConfig` fields (``n_jobs``, ``device``,
    ``tune``).  Write the report with :func:`write_report`.

    With ``two_stage`` (a preset of :data:`classifiers.two_stage.cv.PRESETS`, or a dict of
    :class:`~classifiers.two_stage.model.TwoStageConfig` fields with an optional ``"preset"``),
    the two-stage CNN is cross-validated too, on the images of ``data`` (a folder or manifest, or
    a :func:`data.load_dataset` table) and on the stores' folds; its fold directories go in
    ``two_stage_dir`` (a rerun resumes them) and ``two_stage_stain`` is its stain reference
    (``none``, ``auto``, an image).  ``pipeline.cv_report --classifier two_stage`` runs this.
    """
    config = CVConfig(scheme=scheme, n_folds=n_folds, classifiers=tuple(classifiers), fusion=tuple(fusion),
                      seed=seed, **options)
    config.validate()
    if two_stage is None:
        return run_cross_validation(load_features(stores, scheme, regroup=regroup, magnification=magnification),
                                    config)
    from data.datasets import load_dataset
    from features.store import load_store

    if data is None or two_stage_dir is None:
        raise ValueError("the two-stage CNN is cross-validated on images: give `data` and `two_stage_dir`")
    if isinstance(data, (str, os.PathLike)):
        data = load_dataset(data, scheme=scheme, magnification=magnification)
    overrides = {"preset": two_stage} if isinstance(two_stage, str) else dict(two_stage)
    tables = [load_store(s) if isinstance(s, (str, os.PathLike)) else s for s in stores]
    return cross_validate_two_stage(data, tables, config, two_stage_dir, preset=overrides.pop("preset", "paper"),
                                    overrides=overrides, stain_reference=two_stage_stain)


def cross_validate_two_stage(data, tables: Sequence, config: CVConfig, out_dir, *, preset: str = "paper",
                             overrides: dict | None = None, stain_reference: str = "none",
                             keep_checkpoints: bool = False, progress: bool = False) -> CVResult:
    """The two-stage CNN in ``config``'s scheme and seed (``preset`` + ``overrides``) on the images
    of the table ``data``, with the feature classifiers of ``config`` on ``tables`` (may be empty)
    on the same folds: :func:`classifiers.two_stage.cv.run_two_stage_cross_validation`."""
    import json
    import logging

    from classifiers.two_stage import cv as two_stage_cv
    from data.mapping import resolve_scheme

    scheme = resolve_scheme(config.scheme, data["label"])
    try:
        two_stage = two_stage_cv.preset_config(preset, overrides, scheme=scheme.name if scheme.builtin
                                               else scheme.to_dict(), seed=config.seed)
    except (ValueError, TypeError) as exc:  # unknown preset, unknown or invalid fields
        raise InputDataError(f"`two_stage`: {exc}") from None
    logging.getLogger("classifiers.two_stage.cv").info(
        "two-stage CNN config: %s", json.dumps({k: v for k, v in two_stage.to_dict().items() if k != "stain"}))
    return two_stage_cv.run_two_stage_cross_validation(data, two_stage, config, Path(out_dir), tables=tables,
                                                       stain_reference=stain_reference,
                                                       keep_checkpoints=keep_checkpoints, progress=progress)


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
