"""The two-stage CNN in the cross-validated report, and its predictions in the report's format.

Design notes: docs/two-stage.md, "Design notes: cross-validation".
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from classifiers.evaluation.cv_dataset import (CVDataset, InputDataError, build_dataset, regroupings,
                                               resolve_label_scheme, short_list)
from classifiers.evaluation.cross_validation import CVConfig, CVResult, RunResult, RunSpec, run_cross_validation
from classifiers.evaluation.folds import GroupedFolds
from classifiers.two_stage.grid import N_DIHEDRAL, grid_shape, orient_grid, stack_maps
from classifiers.two_stage.model import (
    TwoStageConfig,
    TwoStageInputError,
    TwoStageModel,
    infer,
    fuse_patch_probabilities,
)
from classifiers.two_stage.training import CheckpointMismatchError
from data.files import atomic_write, atomic_write_text
from classifiers.evaluation.voting import vote
from classifiers.predictions import PredictionResult, predictions_table

log = logging.getLogger(__name__)

__all__ = [
    "FUSION_METHODS",
    "PRESETS",
    "RUNS",
    "TwoStageCVResult",
    "TwoStageRunResult",
    "check_grids",
    "check_same_images",
    "run_two_stage_cross_validation",
    "cross_validate_two_stage",
    "image_dataset",
    "preset_config",
    "predict_two_stage_images",
    "view_scores",
]

#: Patch-fusion baselines of Araujo et al. (2017) on the patch-wise network.
FUSION_METHODS: tuple[str, ...] = ("majority", "max", "sum")

#: ``(run name, method of TwoStageModel, 8-view ensemble)`` of every reported run.
RUNS: tuple[tuple[str, str, bool], ...] = (
    ("two_stage", "two_stage", False),
    ("two_stage_ensemble", "two_stage", True),
    ("patch_majority", "majority", False),
    ("patch_max", "max", False),
    ("patch_sum", "sum", False),
)

#: Named starting points of :func:`preset_config` (``TwoStageConfig`` fields).  ``paper`` is
#: Nazeri et al.'s setting (512-pixel patches of full-resolution images, 30 + 30 epochs, 16
#: augmented copies per patch; days per fold on a CPU).  ``cpu`` is the configuration measured
#: on ``bach-dev`` on 2 CPU cores (README): images scaled by 1/4 (1536 -> 384 pixels), 128-pixel
#: patches (stride 64: 5 x 5 = 25 training patches per image; non-overlapping: a 3 x 3 grid for
#: the image-wise network), half the paper's patch-wise width (8), 25 patch-wise epochs of one
#: randomly rotated/flipped, half the time colour-jittered copy of each patch, batches of 32, the
#: learning rate divided by 10 after epoch 20; the image-wise network as in the paper.
#: ``finetune`` (meant for a GPU; docs/two-stage.md measures its CPU cost) fine-tunes ImageNet
#: EfficientNet-Lite0 as the patch-wise network on images at half resolution with 384-pixel
#: patches (768 pixels of the original): bach-dev's 1536 x 1536 photos give 9 training patches
#: (stride 192) and a 2 x 2 grid covering the whole image for the votes and the image-wise
#: network (512-pixel patches would leave one central patch); 16 maps per patch read by a pooled
#: head (with one map a pooled head leaves one number per patch); Adam at 1e-4 (a tenth of
#: training from scratch: the pretrained filters are to be adjusted, not replaced), 8 epochs of
#: the 8 rotations/flips of every patch (half of them colour-jittered), batches of 16; the
#: image-wise network, trained from scratch on the maps, at the paper's 1e-3 (1e-4 after its
#: 20th epoch).
PRESETS: dict[str, dict] = {
    "paper": {},
    "cpu": dict(scale=0.25, patch_size=128, stride=64, patch_width=8, epochs=25, batch_size=32,
                lr_decay_every=20, patch_copies=1, inference_batch_size=64),
    "finetune": dict(patch_network="efficientnet_lite0", patch_weights="imagenet", scale=0.5, patch_size=384,
                     stride=192, channels=16, patch_head="gap", epochs=8, batch_size=16, learning_rate=1e-4,
                     image_learning_rate=1e-3, lr_decay_every=20, patch_copies=8, inference_batch_size=16),
}

_FOLD_FORMAT = 1
_FOLD_FILE = "fold.json"
_SCORES_FILE = "scores.npz"


def preset_config(preset: str = "paper", overrides: dict | None = None, *, scheme: str, seed: int) -> TwoStageConfig:
    """A :class:`TwoStageConfig` from a preset, JSON-style overrides, the scheme and the seed.

    Parameters
    ----------
    preset : {'paper', 'cpu', 'finetune'}
    overrides : dict, optional
        Any ``TwoStageConfig`` fields except ``scheme``, ``seed`` and ``stain``, which come from
        the report's ``--labels``, ``--seed`` and ``--two-stage-stain``.
    scheme : str or dict
        A built-in scheme name or a :meth:`data.mapping.LabelScheme.to_dict` record.
    seed : int

    Raises
    ------
    ValueError
        Unknown preset or field, or a field set twice.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown two-stage preset {preset!r}; choose from {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    reserved = sorted({"scheme", "seed", "stain"} & set(overrides))
    if reserved:
        raise ValueError(f"the two-stage config may not set {reserved}: they come from `scheme`, `seed` "
                         "and `stain_reference`")
    record = {**TwoStageConfig().to_dict(), **PRESETS[preset], **overrides, "scheme": scheme, "seed": seed}
    return TwoStageConfig.from_dict(record)


# --------------------------------------------------------------------------------------------
# Images, checks
# --------------------------------------------------------------------------------------------


def image_dataset(table: pd.DataFrame, scheme: str) -> CVDataset:
    """A :class:`CVDataset` of images without features: one row per image, no store.

    Parameters
    ----------
    table : pandas.DataFrame
        :func:`data.datasets.load_dataset` output (``image_id, path, label, group``).
    scheme : str

    Raises
    ------
    InputDataError
        Labels that cannot be mapped to `scheme`, fewer than two classes, duplicate ids.
    """
    table = table.sort_values("image_id").reset_index(drop=True)
    if table["image_id"].duplicated().any():
        raise InputDataError(f"duplicate image ids: {short_list(table.loc[table['image_id'].duplicated(), 'image_id'])}")
    label_scheme = resolve_label_scheme(table["label"].to_numpy(), scheme)
    mapped = np.asarray(label_scheme.map(table["label"].astype(str).to_numpy()), dtype=str)
    scheme_classes, scheme = tuple(label_scheme.classes), label_scheme.name
    present = tuple(c for c in scheme_classes if c in set(mapped))
    if len(present) < 2:
        raise InputDataError(f"the data hold only one class ({', '.join(present)}) in scheme {scheme!r}: "
                             "classification needs at least two classes")
    ids, groups = table["image_id"].astype(str).to_numpy(), table["group"].astype(str).to_numpy()
    meta = pd.DataFrame({"image_id": ids, "aug": 0, "group": groups,
                         "source_label": table["label"].astype(str).to_numpy(), "label": mapped})
    images = pd.DataFrame({"image_id": ids, "label": mapped, "group": groups, "n_aug": 1})
    if "magnification" in table.columns:
        images["magnification"] = table["magnification"].astype(str).to_numpy()
    return CVDataset(meta=meta, X=[], store_names=[], images=images, row_image=np.arange(len(ids)),
                     classes=present, scheme=scheme,
                     absent_classes=tuple(c for c in scheme_classes if c not in present), store_configs=[],
                     label_scheme=label_scheme, groupings=regroupings(label_scheme),
                     duplicates=list(table.attrs.get("duplicates", [])))


def check_same_images(features: CVDataset, images: CVDataset) -> None:
    """Raise :class:`InputDataError` unless the stores and the data hold the same images.

    Same image ids, and per image the same label (in the report's scheme) and group, so that
    one fold assignment serves both.
    """
    a, b = set(features.images["image_id"]), set(images.images["image_id"])
    if a != b:
        parts = []
        if a - b:
            parts.append(f"{len(a - b)} image(s) only in the feature store(s): {short_list(a - b)}")
        if b - a:
            parts.append(f"{len(b - a)} image(s) only in `data`: {short_list(b - a)}")
        raise InputDataError(
            "the feature store(s) and `data` do not hold the same images (image ids are paths relative "
            "to the dataset folder or manifest): " + "; ".join(parts) + ". Extract the features from the "
            "same folder or manifest as `data`, or pass matching stores."
        )
    left = features.images.set_index("image_id")
    right = images.images.set_index("image_id").loc[left.index]
    for column in ("label", "group"):
        differ = left.index[left[column].to_numpy() != right[column].to_numpy()]
        if len(differ):
            raise InputDataError(
                f"the feature store(s) and `data` disagree on the {column} of images {short_list(differ)}; "
                "extract the features from the manifest given as `data` (the folds depend on labels and groups)"
            )


def _image_size(path) -> tuple[int, int] | None:
    """``(height, width)`` from the file header, or None when PIL cannot tell."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
        return height, width
    except Exception:
        return None


def check_grids(table: pd.DataFrame, config: TwoStageConfig) -> None:
    """Before any training: every image must give the same non-overlapping patch grid.

    Sizes come from the file headers (scaled as :func:`features.transforms.scale_image` does);
    a file whose header cannot be read is left to training, which names it.

    Raises
    ------
    TwoStageInputError
        An image smaller than one patch, or images of several grids.
    """
    k, grids = config.patch_size, {}
    for image_id, path in zip(table["image_id"], table["path"]):
        size = _image_size(path)
        if size is None:
            continue
        h, w = (size if config.scale == 1.0 else (max(1, round(size[0] * config.scale)),
                                                   max(1, round(size[1] * config.scale))))
        if min(h, w) < k:
            raise TwoStageInputError(
                f"image '{image_id}' is {h}x{w} pixels after scaling by {config.scale}, smaller than one "
                f"{k}x{k} patch; use a smaller patch size or a larger scale"
            )
        rows, cols = grid_shape(h, w, k, k)
        grids.setdefault((min(rows, cols), max(rows, cols)), []).append(str(image_id))
    if len(grids) > 1:
        detail = "; ".join(f"{r}x{c}: {len(v)} image(s), e.g. '{v[0]}'" for (r, c), v in sorted(grids.items()))
        raise TwoStageInputError(f"the images give different patch grids ({detail}) at scale {config.scale} "
                                 f"with {k}-pixel patches; the image-wise network needs images of one size")


# --------------------------------------------------------------------------------------------
# Scores of the 8 views
# --------------------------------------------------------------------------------------------


def view_scores(model: TwoStageModel, image: np.ndarray, name: str = "<array>",
                transforms=range(N_DIHEDRAL)) -> dict[str, np.ndarray]:
    """Class scores of every method for each view of one preprocessed image.

    One pass of the patch-wise network over the patches of all views; the image-wise network
    then takes each view's stacked maps (in the trained grid orientation).

    Parameters
    ----------
    model : TwoStageModel
        Fitted.
    image : numpy.ndarray
        ``(H, W, 3)`` image already preprocessed (:meth:`TwoStageModel.load_image`).
    name : str
        For error messages.
    transforms : sequence of int
        Dihedral transforms (views); view 0 is the identity.

    Returns
    -------
    dict
        ``"two_stage"``, ``"majority"``, ``"max"``, ``"sum"`` -> ``(n_views, n_classes)``, columns
        in ``model.classes_`` order.

    Raises
    ------
    TwoStageInputError
        If the image's grid is not the one the image-wise network takes.
    """
    model._check_grid(image, name)
    views = model._views(image, list(transforms))
    stacks = np.stack([stack_maps(orient_grid(maps, model.grid_)) for maps, _ in views])
    out = {"two_stage": np.asarray(infer(model.image_net_, stacks), dtype=np.float64)}
    for method in FUSION_METHODS:
        out[method] = np.stack([fuse_patch_probabilities(p, method) for _, p in views])
    return out


# --------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------


@dataclass
class TwoStageRunResult(RunResult):
    """A :class:`RunResult` whose rows are views of images, not store rows.

    Attributes
    ----------
    row_labels : numpy.ndarray
        True class of every row of ``row_proba`` (one row per image, or 8 per image for the
        ensemble), for the report's ``row_accuracy``.
    """

    row_labels: np.ndarray | None = None


@dataclass
class TwoStageCVResult(CVResult):
    """A :class:`CVResult` with the two-stage CNN's config, folds and timings (``metrics.json``)."""

    two_stage: dict = field(default_factory=dict)


def _stain_for(table: pd.DataFrame, config: TwoStageConfig, stain_reference: str, fixed: dict | None):
    if fixed is not None:
        return fixed
    if str(stain_reference).lower() == "auto":
        from features.stain import fit_stain_reference

        return fit_stain_reference(table.reset_index(drop=True), config.scale)
    return None


def _fingerprint(config: TwoStageConfig, table: pd.DataFrame, train, test) -> dict:
    return {
        "format": _FOLD_FORMAT,
        "config": config.fingerprint(),
        "train": [[str(i), str(lab), str(g)] for i, lab, g in table.iloc[train][["image_id", "label", "group"]]
                  .itertuples(index=False)],
        "test": [str(i) for i in table["image_id"].iloc[test]],
    }


def _read_fold(fold_dir: Path, fingerprint: dict) -> dict | None:
    path = fold_dir / _FOLD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"'{fold_dir}' holds a two-stage fold trained with another config or other folds (images, "
            "labels, groups, `n_folds`, `seed`); rerun with the same options, or use another `out` (or "
            "delete that directory) to start afresh"
        )
    return record


def _save_scores(path: Path, ids, scores: dict, classes) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, image_id=np.asarray(ids, dtype=str),
                                            classes=np.asarray(classes, dtype=str), **scores))


def _load_scores(path: Path) -> tuple[list, dict, list]:
    with np.load(path, allow_pickle=False) as data:
        scores = {m: data[m] for m in ("two_stage", *FUSION_METHODS)}
        return data["image_id"].tolist(), scores, data["classes"].tolist()


def _history_summary(model: TwoStageModel) -> dict:
    patch, image = model.history_["patch"], model.history_["image"]
    best = [h["val_accuracy"] for h in image if h["val_accuracy"] is not None]
    return {
        "patch_epochs": len(patch),
        "image_epochs": len(image),
        "patch_train_accuracy_last": patch[-1]["accuracy"] if patch else None,
        "patch_val_accuracy_last": patch[-1]["val_accuracy"] if patch else None,
        "image_val_accuracy_best": max(best) if best else None,
        "n_validation_images": len(model.history_.get("validation_ids", [])),
        "device": model.history_.get("device"),
        "patch_weights_sha256": model.history_.get("patch_weights_sha256"),
    }


def _run_fold(k: int, fold_dir: Path, table: pd.DataFrame, train, test, config: TwoStageConfig,
              keep_checkpoints: bool, progress: bool) -> tuple[dict, dict]:
    """Train (or resume, or reuse) fold `k`; return its test scores per method and its record."""
    fingerprint = _fingerprint(config, table, train, test)
    record = _read_fold(fold_dir, fingerprint)
    scores_path = fold_dir / _SCORES_FILE
    if record is not None and scores_path.is_file():
        ids, scores, _ = _load_scores(scores_path)
        if ids == fingerprint["test"]:
            log.info("two-stage fold %d: reusing %s", k, fold_dir)
            return scores, record
    fold_dir.mkdir(parents=True, exist_ok=True)
    if record is not None and (fold_dir / "model" / "config.json").is_file():
        model = TwoStageModel.load(fold_dir / "model")
    else:
        log.info("two-stage fold %d: training on %d images (%d test images)", k, len(train), len(test))
        tic = time.perf_counter()
        model = TwoStageModel(config).fit(table.iloc[train].reset_index(drop=True),
                                          checkpoint_dir=fold_dir / "checkpoints", progress=progress)
        model.save(fold_dir / "model")
        record = {"fingerprint": fingerprint, "fold": k, "train_seconds": round(time.perf_counter() - tic, 1),
                  **_history_summary(model)}
        atomic_write_text(fold_dir / _FOLD_FILE, json.dumps(record, indent=2))
        if not keep_checkpoints:
            import shutil

            shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)
    tic = time.perf_counter()
    per_image = []
    for image_id, path in zip(table["image_id"].iloc[test], table["path"].iloc[test]):
        per_image.append(view_scores(model, model.load_image(path), str(image_id)))
    scores = {m: np.stack([s[m] for s in per_image]) for m in ("two_stage", *FUSION_METHODS)}
    record = {**record, "predict_seconds": round(time.perf_counter() - tic, 1)}
    _save_scores(scores_path, fingerprint["test"], scores, model.classes_.tolist())
    atomic_write_text(fold_dir / _FOLD_FILE, json.dumps(record, indent=2))
    log.info("two-stage fold %d: trained in %.0f s, %d test images predicted (8 views) in %.0f s",
             k, record["train_seconds"], len(test), record["predict_seconds"])
    return scores, record


def _present(scores: np.ndarray, model_classes, classes) -> np.ndarray:
    """Columns of the report's classes (those present), renormalised when a class is absent."""
    index = [list(model_classes).index(c) for c in classes]
    out = scores[..., index]
    if len(index) < len(model_classes):
        total = out.sum(axis=-1, keepdims=True)
        out = np.divide(out, total, out=np.full_like(out, 1.0 / len(index)), where=total > 0)
    return out


def _run_result(dataset: CVDataset, folds: np.ndarray, name: str, method: str, ensemble: bool,
                scores: dict) -> TwoStageRunResult:
    per_view = scores[method] if ensemble else scores[method][:, :1]
    n_images, n_views, n_classes = per_view.shape
    rows = per_view.reshape(-1, n_classes)
    row_image = np.repeat(np.arange(n_images), n_views)
    result = vote(row_image, rows, n_images)
    if method == "majority" and not ensemble:
        # Patch votes tied: the larger summed patch probability decides (TwoStageModel.predict).
        majority = np.argmax(per_view[:, 0] + 1e-9 * scores["sum"][:, 0], axis=1)
        result = replace(result, votes=np.eye(n_classes, dtype=int)[majority], majority=majority,
                         mean_proba_argmax=majority)
    fusion = ("ensemble-8" if ensemble else "single") if method == "two_stage" else f"patch-{method}"
    spec = RunSpec(name, "two_stage", fusion, ())
    images = dataset.images
    frame = predictions_table(images["image_id"].to_numpy(), result, dataset.classes, n_views,
                              truth=images["label"].to_numpy(), groups=images["group"].to_numpy(), folds=folds,
                              magnification=images.get("magnification"),
                              run={"model": name, "classifier": "two_stage", "fusion": fusion, "stores": ""})
    return TwoStageRunResult(spec, (), rows, frame, row_labels=np.repeat(dataset.images["label"].to_numpy(), n_views))


def cross_validate_two_stage(table: pd.DataFrame, dataset: CVDataset, folds: np.ndarray,
                             config: TwoStageConfig, out_dir, *, stain_reference: str = "none",
                             keep_checkpoints: bool = False, progress: bool = False
                             ) -> tuple[list[TwoStageRunResult], dict]:
    """Train and test the two-stage CNN on given folds; one run per entry of :data:`RUNS`.

    Parameters
    ----------
    table : pandas.DataFrame
        The images (``image_id, path, label, group``), the same as ``dataset.images``.
    dataset : CVDataset
        Defines the image order, the report's classes and scheme.
    folds : numpy.ndarray
        Test fold of every image of ``dataset.images``.
    config : TwoStageConfig
        Its ``scheme`` must be the dataset's; its ``stain`` is replaced per fold.
    out_dir : path
        Per-fold directories ``fold-<k>`` (see the module docstring).
    stain_reference : str
        ``'none'`` (the paper: colour augmentation only), ``'auto'`` (Macenko fitted to the most
        typical training image of each fold, never to test images) or an image path (fitted once).
    keep_checkpoints, progress : bool

    Returns
    -------
    runs : list of TwoStageRunResult
    info : dict
        Config, per-fold records (timings, epochs, validation accuracies), total seconds.
    """
    if config.label_scheme.classes != tuple(dataset.label_scheme.classes):
        raise ValueError(f"two-stage config is in scheme {config.label_scheme.name!r} "
                         f"({', '.join(config.label_scheme.classes)}), the report in {dataset.scheme!r}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    table = table.set_index("image_id").loc[dataset.images["image_id"]].reset_index()
    fixed = None
    if str(stain_reference).lower() not in ("none", "auto"):
        from features.stain import fit_stain_reference

        fixed = fit_stain_reference(table, config.scale, reference=stain_reference)
    n_folds = int(folds.max()) + 1
    collected: dict[str, np.ndarray] = {}
    records = []
    for k in range(n_folds):
        train, test = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        fold_config = replace(config, stain=_stain_for(table.iloc[train], config, stain_reference, fixed))
        scores, record = _run_fold(k, out_dir / f"fold-{k}", table, train, test, fold_config,
                                   keep_checkpoints, progress)
        for m, s in scores.items():
            collected.setdefault(m, np.zeros((len(folds),) + s.shape[1:]))[test] = s
        records.append({key: v for key, v in record.items() if key != "fingerprint"}
                       | {"stain_reference": None if fold_config.stain is None else fold_config.stain["reference"]})
    model_classes = config.label_scheme.classes
    collected = {m: _present(s, model_classes, dataset.classes) for m, s in collected.items()}
    runs = [_run_result(dataset, folds, name, method, ensemble, collected) for name, method, ensemble in RUNS]
    info = {
        "config": {k: v for k, v in config.to_dict().items() if k != "stain"},
        "stain_reference": stain_reference,
        "runs": {name: {"method": method, "ensemble": ensemble} for name, method, ensemble in RUNS},
        "folds": records,
        "directory": str(out_dir),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return runs, info


def run_two_stage_cross_validation(data: pd.DataFrame, config: TwoStageConfig, cv: CVConfig, out_dir, *, tables=None,
                   stain_reference: str = "none", keep_checkpoints: bool = False,
                   progress: bool = False) -> TwoStageCVResult:
    """The two-stage CNN, and the deep-feature classifiers when `tables` are given, on shared folds.

    Parameters
    ----------
    data : pandas.DataFrame
        :func:`data.datasets.load_dataset` output.
    config : TwoStageConfig
        In the scheme ``cv.scheme`` (see :func:`preset_config`).
    cv : CVConfig
        Scheme, folds, seed; with `tables`, also the classifiers (``xgboost``, ``logreg``) and
        fusions of :func:`classifiers.evaluation.cross_validation.run_cross_validation`.
    out_dir : path
        Where the per-fold two-stage directories go (``REPORT_DIR/two_stage_folds`` in the CLI).
    tables : sequence of features.store.FeatureTable, optional
        Stores of the same images.
    stain_reference, keep_checkpoints, progress
        See :func:`cross_validate_two_stage`.

    Returns
    -------
    TwoStageCVResult
        Deep-feature runs first, then the :data:`RUNS`; ``folds`` is the one fold assignment.

    Raises
    ------
    InputDataError
        Stores and data over different images, labels or groups; infeasible folds.
    TwoStageInputError
        Images of several patch grids or smaller than a patch (before any training).
    """
    start = time.perf_counter()
    images = image_dataset(data, cv.scheme)
    check_grids(data, config)
    if tables:
        dataset = build_dataset(tables, cv.scheme)
        check_same_images(dataset, images)
        # Infeasible folds fail here, before any training.
        GroupedFolds(cv.n_folds, cv.seed).assign(dataset.images["label"].to_numpy(), dataset.images["group"].to_numpy())
        result = run_cross_validation(dataset, cv)
        folds = result.folds["fold"].to_numpy()
        runs, device = list(result.runs), result.device
    else:
        dataset = images
        folds = GroupedFolds(cv.n_folds, cv.seed).assign(images.images["label"].to_numpy(),
                                                         images.images["group"].to_numpy())
        runs, device = [], None
    two_stage_runs, info = cross_validate_two_stage(
        data, dataset, folds, config, out_dir, stain_reference=stain_reference,
        keep_checkpoints=keep_checkpoints, progress=progress)
    classifiers = tuple(cv.classifiers if tables else ()) + ("two_stage",)
    return TwoStageCVResult(
        dataset=dataset,
        config=replace(cv, classifiers=classifiers),
        folds=dataset.images[["image_id", "group", "label"]].assign(fold=folds),
        runs=runs + two_stage_runs,
        device=device,
        seconds=time.perf_counter() - start,
        two_stage=info,
    )


# --------------------------------------------------------------------------------------------
# Prediction in the deep-feature table format
# --------------------------------------------------------------------------------------------


def _load(model: TwoStageModel, path: str) -> tuple[np.ndarray, str]:
    """:meth:`TwoStageModel.load_image`, also returning why Macenko was skipped ('' if not)."""
    from data.io import read_image

    cfg = model.cfg
    raw = read_image(path)
    if cfg.stain is None:
        return model.preprocess(raw, path), ""
    from features.stain import StainNormalizer

    image = TwoStageModel(replace(cfg, stain=None)).preprocess(raw, path)  # scale, size check
    image, reason = StainNormalizer.from_params(cfg.stain).transform_or_keep(image)
    return image, reason or ""


def predict_two_stage_images(model: TwoStageModel, paths, *, ensemble: bool | None = None):
    """Classify images with the two networks, as :func:`classifiers.feature.predict.predict_images` does.

    The views (8 rotations/flips with ``ensemble``, default ``model.cfg.ensemble``; else the
    image itself) take the place of the colour augmentations: ``prediction`` is their majority
    vote, ``prediction_mean_proba`` the class of their mean probability (Nazeri et al.'s rule),
    ``n_aug`` the number of views.

    Returns
    -------
    classifiers.predictions.PredictionResult
        Same table columns as for a deep-feature model; unreadable images, images smaller than
        a patch or of another grid are in ``skipped`` with their reason.
    """
    from data.io import ImageReadError
    from features.extract import describe_device

    start = time.perf_counter()
    transforms = model._transforms(ensemble)
    classes = tuple(str(c) for c in model.classes_)
    images, notes, blocks, skipped = [], [], [], []
    for path in dict.fromkeys(map(str, paths)):
        try:
            image, note = _load(model, path)
            blocks.append(view_scores(model, image, path, transforms)["two_stage"])
        except (ImageReadError, TwoStageInputError) as exc:
            skipped.append({"image": path, "reason": str(exc)})
            log.warning("skipped %s: %s", path, exc)
            continue
        images.append(path)
        notes.append(note)
    device = describe_device()
    if not images:
        return PredictionResult(predictions_table([], None, classes, 0), skipped, classes,
                                seconds=time.perf_counter() - start, device=device)
    row_proba = np.concatenate(blocks)
    row_image = np.repeat(np.arange(len(images)), len(transforms))
    table = predictions_table(images, vote(row_image, row_proba, len(images)), classes, len(transforms),
                              stain_note=notes)
    return PredictionResult(table, skipped, classes, row_proba, row_image, time.perf_counter() - start, device)
