"""Predict new images with a saved model, extracting their features exactly as in training.

For every store the model was trained on, the store's extraction config is rebuilt from
``model.json`` and checked to be reproducible here (known backbone, same feature format, same
config hash, weights file with the same sha256) *before* any image is read.  Then each image
gets all the colour augmentations and crops of that config, every augmentation is classified,
and the image is decided by the same voting as in cross-validation
(:func:`classifiers.evaluation.voting.vote`: majority of the augmentations, ties by mean probability).

Images are identified by their path *as given*: the random crops of an augmentation are seeded
by this id (see ``features.augment``), so the same spelling of a path reproduces the same
probabilities, and a training image given by its dataset-relative path reproduces the
features in its store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from classifiers.feature.model_io import TrainedModel
from classifiers.evaluation.voting import vote
from classifiers.predictions import PredictionResult, predictions_table

log = logging.getLogger(__name__)


class ModelCompatibilityError(ValueError):
    """This installation cannot reproduce the features a model was trained on.

    The message names what differs (backbone, weights file, feature format) and what to do.
    """


def _made_by(model: TrainedModel) -> str:
    return model.package_version or "unknown version"


def _weights_advice(spec, config, local: Path | None) -> str:
    wanted = config.weights_file or config.weights
    target = f" to {local}" if local else ""
    return (
        f"Use the weights file the model was made with ({wanted}, sha256 {config.weights_sha256}; "
        f"origin: {spec.weights_source}): copy it from the training machine{target}, or pass its "
        f"path with `weights` {config.backbone}=FILE (in Python weights={{'{config.backbone}': FILE}}); "
        "otherwise retrain the model on features extracted here."
    )


def check_weights(config, store_name: str, weights_override: str | None = None) -> Path | None:
    """Check that the backbone weights on this machine are the ones the model was trained with.

    Parameters
    ----------
    config : features.config.ExtractionConfig
    store_name : str
        For messages.
    weights_override : str, optional
        A weights file to use instead of the config's ``weights`` (same sha256 required).

    Returns
    -------
    Path or None
        The local weights file (``None`` for a random-init backbone).

    Raises
    ------
    ModelCompatibilityError
        When the file is missing or its sha256 differs from the config's.
    """
    from features.backbones import WeightsNotFoundError, get_backbone, resolve_weights, weights_sha256

    spec = get_backbone(config.backbone)
    if config.weights_sha256 is None and weights_override is None:
        return None  # random initialisation seeded by config.seed: reproducible anywhere
    if weights_override is None and str(config.weights).lower() not in ("imagenet", "none"):
        # model.json comes from someone else: a path in it is never opened (it could name any
        # local file, whose digest the error would print); only the registry's file or --weights.
        raise ModelCompatibilityError(
            f"store {store_name!r} ({config.backbone}): the model was made with the weights file "
            f"{config.weights}; predict reads only the registry's weights or a file given in `weights`. "
            + _weights_advice(spec, config, None)
        )
    try:
        local = resolve_weights(spec, weights_override or config.weights)
    except WeightsNotFoundError as exc:
        raise ModelCompatibilityError(
            f"store {store_name!r} ({config.backbone}): weights not found on this machine: {exc}. "
            + _weights_advice(spec, config, None)
        ) from None
    digest = None if local is None else weights_sha256(spec, local)
    if digest != config.weights_sha256:
        raise ModelCompatibilityError(
            f"store {store_name!r} ({config.backbone}): the weights file on this machine, {local}, has sha256 "
            f"{digest}, but the model was trained on features from weights with sha256 "
            f"{config.weights_sha256}; its features would differ, so this model cannot be applied. "
            + _weights_advice(spec, config, local)
        )
    return local


def reproducible_configs(model: TrainedModel, weights: dict | None = None) -> list:
    """Rebuild every store's :class:`~features.config.ExtractionConfig`, refusing what differs.

    Parameters
    ----------
    model : TrainedModel
    weights : dict, optional
        ``{backbone: weights file}`` overrides (e.g. the same ImageNet file in another place).

    Returns
    -------
    list of ExtractionConfig
        One per store, with ``weights`` pointing at the file to load here.

    Raises
    ------
    ModelCompatibilityError
        Unknown backbone, another feature format, a config this version hashes differently,
        missing weights or weights with another sha256.
    """
    from dataclasses import replace

    from features.backbones import BACKBONES
    from features.config import FEATURE_FORMAT_VERSION, ExtractionConfig

    weights = dict(weights or {})
    made_by = _made_by(model)
    retrain = (f"retrain the model with this version (pipeline.extract, then pipeline.train), or install "
               f"breast-histology-pipeline {made_by}, which made it")
    configs = []
    for name, record in zip(model.store_names, model.store_configs):
        backbone = record.get("backbone")
        if backbone not in BACKBONES:
            imagenet = sorted(n for n, spec in BACKBONES.items() if not spec.trained)
            trained = sorted(n for n, spec in BACKBONES.items() if spec.trained)
            raise ModelCompatibilityError(
                f"store {name!r}: the model needs backbone {backbone!r}, which this version does not "
                f"have (known: {', '.join(imagenet)}), nor a trained backbone "
                f"({', '.join(trained)}); {retrain}"
            )
        if record.get("feature_format") != FEATURE_FORMAT_VERSION:
            raise ModelCompatibilityError(
                f"store {name!r}: the model's features are in feature format {record.get('feature_format')}, "
                f"this version extracts format {FEATURE_FORMAT_VERSION}; {retrain}"
            )
        try:
            config = ExtractionConfig.from_dict(record)
        except (TypeError, ValueError) as exc:
            raise ModelCompatibilityError(f"store {name!r}: {exc}; {retrain}") from None
        if not _same_config(config, record):
            raise ModelCompatibilityError(
                f"store {name!r}: this version does not reproduce the model's extraction config "
                f"(hash {str(record.get('config_hash'))[:12]}, here {config.config_hash[:12]}); {retrain}"
            )
        local = check_weights(config, name, weights.pop(backbone, None))
        if local is not None:
            config = replace(config, weights=str(local), weights_file=str(local))  # descriptive: same hash
        configs.append(config)
    if weights:
        raise ModelCompatibilityError(
            f"`weights` given for {sorted(weights)}, which the model does not use "
            f"(its backbones: {', '.join(c.backbone for c in configs)})"
        )
    warn_version_differences(model, configs)
    return configs


#: Libraries that change the features (extraction) and the classifier's arithmetic (training).
FEATURE_LIBRARIES = ("tensorflow", "keras", "numpy", "opencv", "staintools")
CLASSIFIER_LIBRARIES = ("xgboost", "scikit-learn", "numpy")


def warn_version_differences(model: TrainedModel, configs) -> list[str]:
    """Log (and return) every library whose version here differs from the one that extracted a
    store's features or trained the model: the predictions may then differ in their last digits."""
    from data.files import version_differences

    notes = []
    for name, config in zip(model.store_names, configs):
        libraries = FEATURE_LIBRARIES + (("openvino",) if config.engine == "openvino" else ())
        if changed := version_differences(config.versions, names=libraries):
            notes.append(f"store {name!r} was extracted with other versions: {', '.join(changed)}")
    libraries = CLASSIFIER_LIBRARIES + (("lightgbm",) if model.classifier == "lightgbm" else ())
    if changed := version_differences(model.versions, names=libraries):
        notes.append(f"the model was trained with other versions: {', '.join(changed)}")
    for note in notes:
        log.warning("%s; features and probabilities may differ slightly from the training machine's", note)
    return notes


def _same_config(config, record: dict) -> bool:
    """Whether ``config`` (rebuilt from ``record``) is the config the record's hash names.

    A field added to :class:`~features.config.ExtractionConfig` after the model was made is
    absent from its record and takes its default, which by this package's convention is the
    earlier behaviour (a change of meaning bumps ``feature_format``, checked separately); the
    check then hashes the record's own fields, canonicalised as ``ExtractionConfig.config_hash``
    does, so it still catches an edited or inconsistent record.
    """
    if config.config_hash == record.get("config_hash"):
        return True
    hashed = {k: v for k, v in config.hashed_dict().items() if k in record}
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest() == record.get("config_hash")


def image_frame(paths) -> pd.DataFrame:
    """The dataset frame extraction expects; the id is the path as given, labels are unknown."""
    paths = [str(p) for p in paths]
    return pd.DataFrame({"image_id": paths, "path": paths, "label": "", "group": paths})


def predict_images(
    model: TrainedModel,
    paths,
    *,
    weights: dict | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    mapping=None,
    configs: list | None = None,
) -> PredictionResult:
    """Extract, classify and vote every image of ``paths``.

    Parameters
    ----------
    model : TrainedModel
        From :func:`classifiers.feature.model_io.load_model`.
    paths : sequence of str
        Image files; each path as given is the image's id (see the module docstring).
    weights : dict, optional
        ``{backbone: file}`` to use instead of the default location of the weights.
    batch_size : int, optional
        Crops per forward pass; default: each store's own (its config's ``batch_size``), which
        reproduces the training features bit for bit.  Another value changes their last bits.
    progress : bool, default=False
        Show a progress bar per store.
    mapping : data.mapping.LabelScheme, optional
        Also read the predictions through this mapping (:func:`add_levels`); the model's own
        groupings are always added as ``prediction_<grouping>`` columns.
    configs : list of ExtractionConfig, optional
        :func:`reproducible_configs` of ``model`` and ``weights`` when the caller has them
        already (it hashes every weights file); computed here otherwise.

    Returns
    -------
    PredictionResult
        Unreadable images are in ``skipped`` with their reason; the others are predicted.

    Raises
    ------
    ModelCompatibilityError
        Before any image is read, if the model's features cannot be reproduced here.
    """
    from features.extract import extract_in_memory

    start = time.perf_counter()
    configs = reproducible_configs(model, weights) if configs is None else configs
    frame = image_frame(dict.fromkeys(map(str, paths)))
    skipped, metas, Xs, devices = [], [], [], {}
    for name, config, dim in zip(model.store_names, configs, model.feature_dims):
        if frame.empty:
            break
        log.info("store %s: %s, %s, %d images", name, config.backbone, config.sampling, len(frame))
        if batch_size is not None and batch_size != config.batch_size:
            log.warning("store %s was extracted with batch size %d; batch size %d changes the last bits "
                        "of the features", name, config.batch_size, batch_size)
        table, summary = extract_in_memory(frame, config, batch_size=batch_size, progress=progress)
        devices[name] = summary.device
        if summary.skipped:
            skipped += [{"image": s["path"], "reason": s["reason"]} for s in summary.skipped]
            gone = {s["image_id"] for s in summary.skipped}
            frame = frame[~frame["image_id"].isin(gone)].reset_index(drop=True)
            # A file that became unreadable after an earlier store read it: drop it there too.
            for k, meta in enumerate(metas):
                keep = ~meta["image_id"].isin(gone).to_numpy()
                metas[k], Xs[k] = meta[keep].reset_index(drop=True), Xs[k][keep]
        if table.X.shape[1] != dim:
            raise ModelCompatibilityError(
                f"store {name!r}: {config.backbone} gives {table.X.shape[1]} features here but the model "
                f"was trained on {dim}; retrain the model with this version"
            )
        metas.append(table.meta.reset_index(drop=True))
        Xs.append(table.X)
    classes = tuple(model.classes)
    device = _devices_line(devices)
    if frame.empty:
        return PredictionResult(predictions_table([], None, classes, 0), skipped, classes,
                                seconds=time.perf_counter() - start, device=device)

    keys = metas[0][["image_id", "aug"]]
    for name, meta in zip(model.store_names[1:], metas[1:]):
        if not keys.equals(meta[["image_id", "aug"]]):  # same images, same augmentation count
            raise ModelCompatibilityError(f"store {name!r} gives other augmentation rows than "
                                          f"{model.store_names[0]!r}; the model's stores are inconsistent")
    images = list(frame["image_id"])
    row_image = pd.Index(images).get_indexer(keys["image_id"])
    row_proba = model.fitted.predict_proba(Xs)
    table = predictions_table(images, vote(row_image, row_proba, len(images)), classes,
                              np.bincount(row_image, minlength=len(images)),
                              stain_note=_stain_notes(images, metas, model.store_names))
    add_levels(table, model, mapping)
    return PredictionResult(table, skipped, classes, row_proba, row_image, time.perf_counter() - start, device)


def _devices_line(devices: dict) -> str:
    """What ran each store's extractor: one device, or ``store: device`` per store when they differ
    (a CNN store on the GPU beside a hand-crafted one on the CPU)."""
    if len(set(devices.values())) <= 1:
        return next(iter(devices.values()), "")
    return "; ".join(f"{name}: {device}" for name, device in devices.items())


def _stain_notes(images, metas, store_names) -> list:
    """One note per image: why Macenko was skipped (per store when stores disagree)."""
    per_store = [dict(zip(m["image_id"], m["stain_note"])) for m in metas]
    notes = []
    for image in images:
        found = [(n, s.get(image)) for n, s in zip(store_names, per_store) if isinstance(s.get(image), str)]
        found = [(n, note) for n, note in found if note]
        if len({note for _, note in found}) <= 1:
            notes.append(found[0][1] if found else "")
        else:
            notes.append("; ".join(f"{n}: {note}" for n, note in found))
    return notes


def add_levels(table: pd.DataFrame, model: TrainedModel, mapping=None) -> list:
    """Add ``prediction_<level>`` columns to a predictions `table`: the model's groupings
    (a bach4 model: bmc3, binary) and, when given, a mapping file read on top of the model's
    classes or of one of its groupings (cross-data-set prediction).  Returns the levels
    (:func:`classifiers.evaluation.levels.prediction_levels`), the model's own first."""
    from classifiers.evaluation.levels import prediction_levels

    scheme, groupings = model.scheme_objects()
    levels = prediction_levels(scheme, groupings, mapping)
    at = table.columns.get_loc("prediction_mean_proba") + 1 if "prediction_mean_proba" in table else len(table.columns)
    for offset, level in enumerate(levels[1:]):
        table.insert(at + offset, f"prediction_{level.name}", table["prediction"].map(level.from_model))
    return levels


def predict_dataset(model: TrainedModel, data: pd.DataFrame, *, mapping=None, **kwargs):
    """Predict a labelled data set (:func:`data.datasets.load_dataset`) and measure accuracy.

    Parameters
    ----------
    model : TrainedModel
    data : pandas.DataFrame
        ``image_id, path, label, group`` (and ``magnification``).
    mapping : data.mapping.LabelScheme, optional
        Reads the predictions in another data set's classes (see :func:`add_levels`).
    **kwargs
        As :func:`predict_images`.

    Returns
    -------
    result : PredictionResult
        Its table adds ``image_id``, ``truth``, ``group`` (and ``magnification``) and the
        ``prediction_<level>`` columns.
    accuracy : pandas.DataFrame
        One row per level the labels can be read in: image-level and patient-level accuracy
        (:func:`classifiers.evaluation.levels.level_accuracy`); per magnification too when the
        images have one (column ``magnification``, ``all`` for the whole set).
    """
    from classifiers.evaluation.levels import level_accuracy

    from classifiers.evaluation.levels import prediction_levels

    result = predict_images(model, data["path"].astype(str).tolist(), mapping=mapping, **kwargs)
    table = result.table
    info = data.assign(path=data["path"].astype(str)).set_index("path")
    extra = [c for c in ("image_id", "label", "group", "magnification") if c in info.columns]
    for k, column in enumerate(extra):
        values = info.loc[table["image"], column].to_numpy() if len(table) else []
        table.insert(1 + k, "truth" if column == "label" else column, values)
    scheme, groupings = model.scheme_objects()
    levels = prediction_levels(scheme, groupings, mapping)
    parts = []
    mags = table["magnification"].astype(str) if "magnification" in table else pd.Series("", index=table.index)
    for mag in ["all"] + sorted({m for m in mags if m}, key=lambda m: (len(m), m)):
        part = table if mag == "all" else table[mags == mag]
        found = level_accuracy(part, part["truth"].tolist(), levels, scheme)
        if (mags != "").any():
            found.insert(1, "magnification", mag)
        parts.append(found)
    accuracy = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if accuracy.empty and len(table):
        log.warning("the input's labels (%s) are not classes of any level of the model (%s); no accuracy",
                    ", ".join(sorted(set(table["truth"]))), "; ".join(lv.name for lv in levels))
    return result, accuracy
