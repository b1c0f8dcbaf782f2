"""Fit the final model on all images and save / load it as a *model directory*.

A model directory is what labs send each other, so reading one must never run code: every
file holds data only, and nothing is ever unpickled.

Layout::

    MODEL_DIR/model.json         format version, package version, scheme, label_scheme (its
                                 classes and the label mapping), groupings (coarser schemes
                                 predict also reports), classes, classifier name and parameters, fusion, the stores' extraction configs
                                 (their ``config.json`` records) and feature sizes, training
                                 summary, and the sha256 of every estimator file
    MODEL_DIR/estimator-<k>.json an XGBoost booster (XGBoost's own JSON, ``save_model``;
                                 classifiers ``xgboost`` and ``xgboost-es``)
    MODEL_DIR/estimator-<k>.txt  a LightGBM booster (LightGBM's own text format)
    MODEL_DIR/estimator-<k>.npz  a logistic regression as plain arrays: scaler ``mean``,
                                 ``scale``, ``var``, ``coef``, ``intercept``, ``classes``
                                 (read with ``allow_pickle=False``)

There is one estimator per feature block: one for a single store or ``concat`` fusion, one
per store for ``mean-proba`` fusion (as in :mod:`classifiers.evaluation.cross_validation`).  The directory is
written to a temporary sibling, synced and swapped into place, so an interrupted ``train`` leaves
the old model or the new one, never half a model or none.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from data.files import atomic_directory, check_output_dir, file_sha256, package_version, software_versions
from classifiers.evaluation.cv_dataset import CVDataset, InputDataError
from classifiers.evaluation.cross_validation import FUSION_CHOICES, CVConfig, FittedModel, RunSpec, check_scheme, fit_run_model
from classifiers.feature.estimators import (CLASSIFIER_NAMES, DEVICE_CHOICES, EARLY_STOPPING_NAMES, INSTANCE_CLASSIFIER_NAMES, SignedSquareRoot,
                                            XGBoostFeatureClassifier)
from classifiers.feature.booster_check import BoosterFormatError, check_booster_json, check_lightgbm_text

#: Version of the model-directory layout; a directory of another version is refused.
MODEL_FORMAT_VERSION = 1
MODEL_FILE = "model.json"
#: Written in ``model.json`` so a stray JSON file is not mistaken for a model.
MODEL_KIND = "breast-histology-pipeline feature model"

# Estimator files must be plain names inside the directory (a crafted model.json must not
# make us read ../../somewhere).
_SAFE_NAME = re.compile(r"^estimator-\d+\.(json|npz|txt)$")
#: Estimator file suffix of each classifier.
_SUFFIX = {"xgboost": ".json", "xgboost-es": ".json", "lightgbm": ".txt", "logreg": ".npz", "logreg-sqrt": ".npz"}


class ModelFormatError(ValueError):
    """A model directory is missing, incomplete, corrupt or from another version.

    The message says what to do (retrain, install another version, copy the whole directory).
    """


@dataclass(frozen=True)
class TrainConfig:
    """How the final model is fitted.

    Parameters
    ----------
    scheme : str, default="auto"
        Label scheme the model predicts in: ``auto``, ``classes``, a built-in name or a mapping
        file (:func:`classifiers.evaluation.cv_dataset.build_dataset`).
    classifier : {"xgboost", "logreg", "logreg-sqrt", "xgboost-es", "lightgbm"}, default="xgboost"
    fusion : {"concat", "mean-proba"}, default="concat"
        How several stores are combined (as in cross-validation); ignored with one store.
    seed : int, default=0
        Classifier seed (same meaning as in ``pipeline.cv_report``).
    n_jobs : int, default=2
        XGBoost threads.
    device : {"auto", "cpu", "cuda"}, default="auto"
        XGBoost training device; prediction always runs on the CPU.
    tune : bool, default=False
        Choose the hyper-parameters by an inner grouped CV of all training images
        (:mod:`classifiers.feature.tuning`), as ``pipeline.cv_report --tune`` does in each fold; the
        choice is recorded in the model's ``training`` entry.
    """

    scheme: str = "auto"
    classifier: str = "xgboost"
    fusion: str = "concat"
    seed: int = 0
    n_jobs: int = 2
    device: str = "auto"
    tune: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` on unknown names or bad numbers."""
        if self.classifier in INSTANCE_CLASSIFIER_NAMES:
            raise ValueError(f"classifier {self.classifier!r} is cross-validated only (pipeline.cv_report "
                             "--classifier mil); a saved model of it is not built yet: train one of "
                             f"{', '.join(CLASSIFIER_NAMES)} (on an instance store they read the mean of the instances)")
        if self.classifier not in CLASSIFIER_NAMES:
            raise ValueError(f"unknown classifier {self.classifier!r}; choose from {CLASSIFIER_NAMES}")
        if self.fusion not in FUSION_CHOICES:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose from {FUSION_CHOICES}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        self.cv_config().validate()

    def cv_config(self) -> CVConfig:
        """The equivalent :class:`CVConfig`, so the final fit is the one cross-validated."""
        return CVConfig(scheme=self.scheme, classifiers=(self.classifier,), fusion=(self.fusion,),
                        seed=self.seed, n_jobs=self.n_jobs, device=self.device, tune=self.tune)


@dataclass
class TrainedModel:
    """A fitted model with everything prediction needs to reproduce its features.

    Attributes
    ----------
    fitted : FittedModel
        Estimators, their feature blocks (store indices) and ``classes``.
    scheme : str
    classifier : str
    params : dict
        The classifier's parameters (JSON values).
    fusion : str
        ``"single"``, ``"concat"`` or ``"mean-proba"``.
    store_names : list of str
    store_configs : list of dict
        Each store's ``config.json`` record (an ``ExtractionConfig`` plus ``config_hash``).
    feature_dims : list of int
        Feature columns of each store.
    absent_classes : tuple of str
        Classes of ``scheme`` with no training image (never predicted).
    training : dict
        Images and rows used, images per class, seed.
    package_version : str
        Version of this package that trained the model.
    versions : dict
        :func:`data.files.software_versions` of the training machine (``model.json``
        ``versions``); each store's config holds those of its extraction.
    format_version : int
    label_scheme : dict
        :meth:`data.mapping.LabelScheme.to_dict` of the scheme (classes and the mapping from the
        training labels); empty for models written before it was recorded.
    groupings : list of dict
        The coarser schemes its predictions are also reported in (``predict`` gives both levels).
    """

    fitted: FittedModel
    scheme: str
    classifier: str
    params: dict
    fusion: str
    store_names: list
    store_configs: list
    feature_dims: list
    absent_classes: tuple = ()
    training: dict = field(default_factory=dict)
    package_version: str = ""
    format_version: int = MODEL_FORMAT_VERSION
    versions: dict = field(default_factory=dict)
    label_scheme: dict = field(default_factory=dict)
    groupings: list = field(default_factory=list)

    @property
    def classes(self) -> tuple:
        return tuple(self.fitted.classes)

    def scheme_objects(self) -> tuple:
        """``(LabelScheme, [coarser LabelScheme])`` of the model (built-in ones for old models)."""
        from data.mapping import LabelScheme, builtin_scheme, groupings

        if self.label_scheme:
            return (LabelScheme.from_dict(self.label_scheme),
                    [LabelScheme.from_dict(g) for g in self.groupings])
        scheme = builtin_scheme(self.scheme)
        return scheme, groupings(scheme)


def _json_params(params: dict) -> dict:
    """Keep the JSON-representable parameters (all of ours are numbers, strings or None)."""
    return {k: v for k, v in params.items() if v is None or isinstance(v, (bool, int, float, str))}


def _classifier_params(estimator) -> dict:
    if isinstance(estimator, Pipeline):  # StandardScaler -> LogisticRegression
        return _json_params(estimator.steps[-1][1].get_params(deep=False))
    return _json_params(estimator.get_params(deep=False))


def train_model(dataset: CVDataset, config: TrainConfig, *, client=None) -> TrainedModel:
    """Fit the final model on every row of ``dataset`` (all images, all augmentations).

    Parameters
    ----------
    dataset : CVDataset
        From :func:`classifiers.evaluation.cv_dataset.build_dataset` in ``config.scheme``.
    config : TrainConfig
    client : distributed.Client, optional
        Train XGBoost with ``xgboost.dask`` on this cluster
        (:mod:`classifiers.feature.dask_xgboost`); the saved model is the same kind of file.

    Returns
    -------
    TrainedModel

    Raises
    ------
    InputDataError
        If the dataset is in another scheme than ``config.scheme``.
    """
    config.validate()
    check_scheme(dataset, config.scheme)
    n_stores = len(dataset.X)
    fusion = "single" if n_stores == 1 else config.fusion
    name = config.classifier if n_stores == 1 else f"{config.classifier}-{fusion}"
    spec = RunSpec(name, config.classifier, fusion, tuple(range(n_stores)))
    training = {}
    if client is None:
        fitted = fit_run_model(dataset, spec, config.cv_config(), rows=None)
    else:
        from classifiers.feature.dask_xgboost import fit_run_model_on_dask

        fitted = fit_run_model_on_dask(dataset, spec, config.cv_config(), client)
        training["dask_workers"] = len(client.nthreads())
    if fitted.chosen_params:
        training["chosen_params"] = fitted.chosen_params
    if config.classifier in EARLY_STOPPING_NAMES:
        training["rounds"] = [int(est.n_rounds_) for est in fitted.estimators]  # found by early stopping
    per_class = dataset.images["label"].value_counts()
    return TrainedModel(
        fitted=fitted,
        scheme=dataset.scheme,
        classifier=config.classifier,
        params=_classifier_params(fitted.estimators[0]),
        fusion=fusion,
        store_names=list(dataset.store_names),
        store_configs=[dict(c) for c in dataset.store_configs],
        feature_dims=[int(X.shape[1]) for X in dataset.X],
        absent_classes=tuple(dataset.absent_classes),
        training={
            "n_images": int(len(dataset.images)),
            "n_rows": int(len(dataset.meta)),
            "images_per_class": {c: int(per_class.get(c, 0)) for c in dataset.classes},
            "seed": config.seed,
            **training,
        },
        package_version=package_version(),
        versions=software_versions(),
        label_scheme=dataset.label_scheme.to_dict(),
        groupings=[g.to_dict() for g in dataset.groupings],
    )


# ---------------------------------------------------------------------------------------
# estimators <-> data-only files
# ---------------------------------------------------------------------------------------


def save_xgboost(estimator: XGBoostFeatureClassifier, path: Path) -> None:
    """Write the booster in XGBoost's JSON format (data only)."""
    estimator.booster_.save_model(str(path))


def load_xgboost(path: Path, classes, params: dict, n_features: int,
                 cls: type = XGBoostFeatureClassifier) -> XGBoostFeatureClassifier:
    """Rebuild a fitted :class:`XGBoostFeatureClassifier` around a booster read from JSON.

    Parameters
    ----------
    path : Path
        A file written by :func:`save_xgboost`.
    classes : sequence of str
        The estimator's ``classes_`` (booster outputs are class indices into it).
    params : dict
        Constructor parameters of the wrapper; ``device`` is forced to ``"cpu"`` because the
        machine predicting may have no GPU, and the trees are the same on either device.
    n_features : int
        Feature count checked on every ``predict_proba``.
    cls : type, default=XGBoostFeatureClassifier
        The wrapper (:class:`~classifiers.feature.boosting.XGBoostEarlyStoppingClassifier` for
        ``xgboost-es``).

    The trees are checked (:func:`classifiers.feature.booster_check.check_booster_json`) before XGBoost
    parses the same bytes: a crafted file must not crash or hang the process.
    """
    import xgboost

    raw = Path(path).read_bytes()
    try:
        check_booster_json(raw, int(n_features), len(classes), str(path))
    except BoosterFormatError as exc:
        raise ModelFormatError(str(exc)) from None
    known = cls().get_params()
    wrapper = cls(**{**{k: v for k, v in params.items() if k in known}, "device": "cpu"})
    booster = xgboost.XGBClassifier()
    booster.load_model(bytearray(raw))
    booster.set_params(device="cpu", n_jobs=wrapper.n_jobs)
    if int(booster.n_classes_) != len(classes):
        raise ModelFormatError(f"{path.name}: the booster has {booster.n_classes_} classes but model.json lists "
                               f"{len(classes)}; the model directory is inconsistent, copy it again or retrain")
    wrapper.booster_ = booster
    wrapper.classes_ = np.asarray(classes, dtype=object)
    wrapper.n_features_in_ = int(n_features)
    wrapper.device_ = "cpu"
    return wrapper


def save_lightgbm(estimator, path: Path) -> None:
    """Write the booster in LightGBM's text format (data only)."""
    Path(path).write_text(estimator.booster_.model_to_string())


def load_lightgbm(path: Path, classes, params: dict, n_features: int):
    """Rebuild a fitted :class:`~classifiers.feature.boosting.LightGBMFeatureClassifier` from
    :func:`save_lightgbm`'s file, checked first (:func:`~classifiers.feature.booster_check.check_lightgbm_text`).

    Raises
    ------
    LightGBMMissingError
        If lightgbm is not installed.
    ModelFormatError
        If the file is not a well-formed model of ``n_features`` features and ``classes``.
    """
    from classifiers.feature.boosting import LightGBMFeatureClassifier, import_lightgbm

    lightgbm = import_lightgbm()
    try:
        text = check_lightgbm_text(Path(path).read_bytes(), int(n_features), len(classes), str(path))
    except BoosterFormatError as exc:
        raise ModelFormatError(str(exc)) from None
    known = LightGBMFeatureClassifier().get_params()
    wrapper = LightGBMFeatureClassifier(**{k: v for k, v in params.items() if k in known})
    wrapper.booster_ = lightgbm.Booster(model_str=text)
    wrapper.classes_ = np.asarray(classes, dtype=object)
    wrapper.n_features_in_ = int(n_features)
    wrapper.n_rounds_ = int(wrapper.booster_.current_iteration())
    wrapper.device_ = "cpu"
    return wrapper


def save_logreg(pipeline: Pipeline, path: Path) -> None:
    """Write a fitted ``[SignedSquareRoot ->] StandardScaler -> LogisticRegression`` pipeline as plain arrays."""
    scaler, logreg = pipeline.steps[-2][1], pipeline.steps[-1][1]
    if not isinstance(scaler, StandardScaler) or not isinstance(logreg, LogisticRegression):
        raise TypeError("expected a StandardScaler -> LogisticRegression pipeline (classifiers.feature.estimators.make_logreg)")
    # Fitted dtypes are kept (coef_ is float32 when fitted on float32 features): the same
    # arrays give bit-identical probabilities.
    arrays = {
        "mean": scaler.mean_, "scale": scaler.scale_, "var": scaler.var_,
        "n_samples_seen": scaler.n_samples_seen_, "coef": logreg.coef_,
        "intercept": logreg.intercept_, "n_iter": logreg.n_iter_,
        "classes": np.asarray(logreg.classes_).astype(str),  # unicode, not object: no pickle
        # 1 when the features pass through SignedSquareRoot first (files without it: 0).
        "signed_sqrt": np.int8(isinstance(pipeline.steps[0][1], SignedSquareRoot)),
    }
    with open(path, "wb") as handle:
        np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})


def load_logreg(path: Path, params: dict) -> Pipeline:
    """Reassemble the pipeline from :func:`save_logreg`'s arrays (``allow_pickle=False``).

    The arrays are exactly the fitted attributes, so ``predict_proba`` computes the same
    numbers as the original estimator.
    """
    with np.load(path, allow_pickle=False) as arrays:
        a = {k: arrays[k] for k in arrays.files}
    missing = {"mean", "scale", "var", "coef", "intercept", "classes"} - set(a)
    if missing:
        raise ModelFormatError(f"{path.name} lacks arrays {sorted(missing)}; the model directory is incomplete")
    n_features = a["coef"].shape[1]
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = a["mean"], a["scale"], a["var"]
    scaler.n_samples_seen_ = a["n_samples_seen"][()] if "n_samples_seen" in a else 0
    scaler.n_features_in_ = n_features
    known = LogisticRegression().get_params()
    logreg = LogisticRegression(**{k: v for k, v in params.items() if k in known})
    logreg.coef_, logreg.intercept_ = a["coef"], a["intercept"]
    logreg.classes_ = a["classes"].astype(object)  # as fitted on string labels
    logreg.n_iter_ = a.get("n_iter", np.zeros(1, np.int64))
    logreg.n_features_in_ = n_features
    steps = [("scale", scaler), ("logreg", logreg)]
    if int(a.get("signed_sqrt", 0)):
        root = SignedSquareRoot()
        root.n_features_in_ = n_features
        steps.insert(0, ("sqrt", root))
    return Pipeline(steps)


# ---------------------------------------------------------------------------------------
# model directory
# ---------------------------------------------------------------------------------------


def model_record(model: TrainedModel, estimator_files: list) -> dict:
    """The ``model.json`` content (see the module docstring)."""
    fitted = model.fitted
    return {
        "kind": MODEL_KIND,
        "format_version": MODEL_FORMAT_VERSION,
        "package_version": model.package_version or package_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": model.versions or software_versions(),
        "scheme": model.scheme,
        "label_scheme": model.label_scheme,
        "groupings": model.groupings,
        "classes": list(model.classes),
        "absent_classes": list(model.absent_classes),
        "classifier": model.classifier,
        "params": model.params,
        "fusion": model.fusion,
        "run_name": fitted.spec.name,
        "stores": [
            {"name": name, "feature_dim": dim, "config": config}
            for name, dim, config in zip(model.store_names, model.feature_dims, model.store_configs)
        ],
        "estimators": [
            {
                "file": file_name,
                "stores": list(block),
                "classes": [str(c) for c in est.classes_],
                "n_features": int(sum(model.feature_dims[s] for s in block)),
                "sha256": sha,
            }
            for (file_name, sha), est, block in zip(estimator_files, fitted.estimators, fitted.blocks)
        ],
        "training": model.training,
    }


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a model directory (what ``--overwrite`` may replace)."""
    return (Path(path) / MODEL_FILE).is_file()


def check_model_out(out_dir: Path | str, *, overwrite: bool = False) -> Path:
    """Refuse, before training, an ``--out`` that :func:`save_model` could not replace."""
    return check_output_dir(out_dir, overwrite=overwrite, is_ours=is_model_dir, what="model directory")


def save_model(model: TrainedModel, out_dir: Path | str, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a model directory; returns its path.

    The directory is written into a hidden sibling, synced and swapped into place
    (:func:`data.files.atomic_directory`): an interrupt or a power loss leaves the old model
    or the new one, and the old one is deleted only once the new one is in place.

    Parameters
    ----------
    model : TrainedModel
    out_dir : path
        Created; must not exist or be empty, unless ``overwrite`` and it is a model directory.
    overwrite : bool, default=False
        Replace an existing *model* directory (never any other non-empty directory).
    """
    out = check_model_out(out_dir, overwrite=overwrite)
    with atomic_directory(out) as tmp:
        files = []
        for k, est in enumerate(model.fitted.estimators):
            path = tmp / f"estimator-{k}{_SUFFIX[model.classifier]}"
            {".json": save_xgboost, ".txt": save_lightgbm, ".npz": save_logreg}[path.suffix](est, path)
            files.append((path.name, file_sha256(path)))
        record = model_record(model, files)
        (tmp / MODEL_FILE).write_text(json.dumps(record, indent=2, allow_nan=False))
    return out


def _retrain_hint(made_by: str) -> str:
    return (f"retrain it with this version (python -m pipeline.train on the same feature stores), or "
            f"install breast-histology-pipeline {made_by} to use it as it is")


def read_model_record(model_dir: Path | str) -> dict:
    """Read and check ``model.json`` (format version, kind) without loading estimators."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not model_dir.is_dir():
        raise ModelFormatError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise ModelFormatError(f"{model_dir} is not a model directory (no {MODEL_FILE}); "
                               "make one with python -m pipeline.train")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}); copy the model directory again") from None
    if not isinstance(record, dict) or record.get("kind") != MODEL_KIND:
        raise ModelFormatError(f"{path} is not a model file of this package; make one with python -m pipeline.train")
    made_by = str(record.get("package_version", "unknown version"))
    version = record.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise ModelFormatError(
            f"{model_dir} is in model format {version}, written by breast-histology-pipeline {made_by}; "
            f"this version ({package_version()}) reads model format {MODEL_FORMAT_VERSION} only: "
            + _retrain_hint(made_by)
        )
    needed = ("scheme", "classes", "classifier", "params", "fusion", "stores", "estimators")
    missing = [k for k in needed if k not in record]
    if missing:
        raise ModelFormatError(f"{path} lacks {missing}; the model directory is damaged: " + _retrain_hint(made_by))
    return record


def load_model(model_dir: Path | str) -> TrainedModel:
    """Load a model directory written by :func:`save_model`.

    Only JSON and ``.npz`` (``allow_pickle=False``) are read; estimator files are checked
    against the sha256 recorded in ``model.json``.

    Raises
    ------
    ModelFormatError
        Missing or damaged directory, another format version, unknown classifier.
    """
    model_dir = Path(model_dir)
    record = read_model_record(model_dir)
    try:
        return _load_checked(model_dir, record)
    except (KeyError, TypeError, AttributeError) as exc:  # a field missing or of the wrong type
        raise ModelFormatError(f"{model_dir}/{MODEL_FILE} is damaged ({type(exc).__name__}: {exc}): "
                               + _retrain_hint(str(record.get("package_version")))) from None


def _load_checked(model_dir: Path, record: dict) -> TrainedModel:
    made_by = str(record.get("package_version"))
    classifier = record["classifier"]
    if classifier not in CLASSIFIER_NAMES:
        raise ModelFormatError(f"{model_dir} uses classifier {classifier!r}, which this version does not know "
                               f"({', '.join(CLASSIFIER_NAMES)}): " + _retrain_hint(made_by))
    stores = record["stores"]
    dims = [int(s["feature_dim"]) for s in stores]
    estimators, blocks = [], []
    for entry in record["estimators"]:
        name = str(entry.get("file", ""))
        if not _SAFE_NAME.match(name):
            raise ModelFormatError(f"{model_dir}/{MODEL_FILE} names an estimator file {name!r} that is not a "
                                   "plain estimator-<k>.json/.npz/.txt in the directory; refusing to read it")
        path = model_dir / name
        if not path.is_file():
            raise ModelFormatError(f"{path} is missing; copy the whole model directory")
        if file_sha256(path) != entry.get("sha256"):
            raise ModelFormatError(f"{path} does not match the sha256 in {MODEL_FILE}: the directory was modified "
                                   "or copied incompletely; copy it again")
        if path.suffix != _SUFFIX[classifier]:
            raise ModelFormatError(f"{path}: a {classifier} model must be an estimator-<k>{_SUFFIX[classifier]} file")
        if classifier in ("xgboost", "xgboost-es"):
            from classifiers.feature.boosting import XGBoostEarlyStoppingClassifier

            cls = XGBoostFeatureClassifier if classifier == "xgboost" else XGBoostEarlyStoppingClassifier
            est = load_xgboost(path, entry["classes"], record["params"], entry["n_features"], cls)
        elif classifier == "lightgbm":
            est = load_lightgbm(path, entry["classes"], record["params"], entry["n_features"])
        else:
            est = load_logreg(path, record["params"])
            if ([str(c) for c in est.classes_] != list(entry["classes"])
                    or est.n_features_in_ != int(entry["n_features"])):
                raise ModelFormatError(f"{path} does not match its entry in {MODEL_FILE} (classes or feature "
                                       "count); the model directory is inconsistent: " + _retrain_hint(made_by))
        estimators.append(est)
        blocks.append(tuple(int(s) for s in entry["stores"]))
    spec = RunSpec(record.get("run_name", classifier), classifier, record["fusion"], tuple(range(len(stores))))
    return TrainedModel(
        fitted=FittedModel(spec, estimators, blocks, tuple(record["classes"])),
        scheme=record["scheme"],
        classifier=classifier,
        params=record["params"],
        fusion=record["fusion"],
        store_names=[s["name"] for s in stores],
        store_configs=[s["config"] for s in stores],
        feature_dims=dims,
        absent_classes=tuple(record.get("absent_classes", ())),
        training=record.get("training", {}),
        package_version=made_by,
        format_version=record["format_version"],
        versions=dict(record.get("versions") or {}),
        label_scheme=dict(record.get("label_scheme") or {}),
        groupings=list(record.get("groupings") or []),
    )
