"""The Methods of a cross-validated report: what was done, in numbers and in words.

:func:`describe_methods` collects, from the result and the stores' own configs, everything a
paper's Methods section needs (data, extraction, classifier, cross-validation, versions, the
command line); :func:`methods_paragraph` turns it into a paragraph ready to paste.
"""

from __future__ import annotations

import shlex

import numpy as np

from classifiers.feature.estimators import make_classifier
from classifiers.feature.tuning import PARAM_GRIDS, public_params
from data.files import software_versions
from data.labels import display_name

#: Hyper-parameters of each classifier stated in the Methods (the others are library defaults).
_STATED_PARAMS = {
    "xgboost": ("n_estimators", "max_depth", "learning_rate", "subsample", "colsample_bytree",
                "min_child_weight", "reg_lambda"),
    "logreg": ("C", "max_iter", "tol"),
    "logreg-sqrt": ("C", "max_iter", "tol"),
    "xgboost-es": ("n_estimators", "max_depth", "learning_rate", "subsample", "colsample_bytree",
                   "min_child_weight", "reg_lambda", "validation_fraction", "early_stopping_rounds", "refit"),
    "lightgbm": ("n_estimators", "num_leaves", "max_depth", "learning_rate", "min_child_samples", "subsample",
                 "colsample_bytree", "reg_lambda", "validation_fraction", "early_stopping_rounds", "refit"),
    "mil": ("hidden", "attention", "dropout", "weight_decay", "learning_rate", "max_epochs", "batch_size",
            "validation_fraction", "patience", "refit"),
}
_CLASSIFIER_WORDS = {
    "xgboost": "gradient-boosted trees (XGBoost, tree method hist)",
    "logreg": "L2-regularised multinomial logistic regression on standardised features (scikit-learn)",
    "logreg-sqrt": "L2-regularised multinomial logistic regression on standardised features after a signed "
                   "square root of every feature, sign(x)*sqrt(|x|) (power normalisation; scikit-learn)",
    "xgboost-es": "gradient-boosted trees (XGBoost, tree method hist) whose number of rounds (at most "
                  "n_estimators) was chosen inside each training fold by early stopping on the multi-class "
                  "log-loss of a grouped, stratified inner split holding out validation_fraction of the images "
                  "(stopping after early_stopping_rounds rounds without improvement), then trained again on "
                  "all the fold's training images for that number of rounds (refit)",
    "lightgbm": "gradient-boosted trees (LightGBM, the library of Rakhlin et al. 2018) whose number of rounds (at most "
                "n_estimators) was chosen inside each training fold by early stopping on the multi-class "
                "log-loss of a grouped, stratified inner split holding out validation_fraction of the images "
                "(stopping after early_stopping_rounds rounds without improvement), then trained again on "
                "all the fold's training images for that number of rounds (refit)",
    "mil": "gated attention-based multiple-instance pooling (Ilse et al. 2018) of the instances of each "
           "augmented image (a dense projection, tanh and sigmoid attention branches, a softmax layer; "
           "Keras, AdamW), trained with early stopping on a grouped, stratified inner split of each "
           "training fold",
    "two_stage": "the two-stage CNN of Nazeri et al. (2018), trained inside each training fold (its "
                 "configuration is in the report's two-stage section)",
}
_BACKBONE_WORDS = {
    "efficientnet_lite0": "EfficientNet-Lite0",
    "efficientnet_lite0_multilevel": "EfficientNet-Lite0 (multi-level features)",
    "efficientnet_lite1": "EfficientNet-Lite1",
    "efficientnet_lite1_multilevel": "EfficientNet-Lite1 (multi-level features)",
    "efficientnet_lite2": "EfficientNet-Lite2",
    "efficientnet_lite2_multilevel": "EfficientNet-Lite2 (multi-level features)",
    "resnet50": "ResNet50",
    "xception": "Xception",
}
_VOTING = ("each image's augmentations are classified separately and the image takes the majority "
           "vote (ties: highest mean probability); mean-probability voting, the class with the "
           "highest probability averaged over the augmentations, is reported alongside")
_VERSION_NAMES = ("breast-histology-pipeline", "tensorflow", "keras", "xgboost", "lightgbm", "scikit-learn", "numpy",
                  "opencv", "staintools")


def two_stage_training_words(config: dict | None) -> str:
    """How the two-stage CNN's networks were initialised and trained, from its config record
    (``TwoStageConfig.to_dict``; records made before ``patch_network`` existed: from scratch)."""
    network = (config or {}).get("patch_network", "nazeri")
    if network == "nazeri":
        return "both networks trained from scratch inside each training fold"
    start = ("pretrained on ImageNet" if (config or {}).get("patch_weights") == "imagenet"
             else f"starting from weights {config.get('patch_weights')}" if config.get("patch_weights")
             else "randomly initialised")
    return (f"the patch-wise network an {_BACKBONE_WORDS.get(network, network)} {start}, fine-tuned with its batch "
            "normalisation frozen, and the image-wise network trained from scratch, both inside each training fold")


def command_line(module: str, argv) -> str:
    """``python -m MODULE ARGS`` quoted for a shell, as the Methods state it."""
    return shlex.join(["python", "-m", module, *map(str, argv)])


def _classifier_params(name: str) -> dict:
    if name not in _STATED_PARAMS:  # the two-stage CNN: its config is in its own report section
        return {}
    params = public_params(make_classifier(name).get_params())
    return {k: params[k] for k in _STATED_PARAMS.get(name, ()) if k in params}


def _chosen_summary(chosen: list) -> dict:
    """``{param: {value: folds}}`` over the inner-CV choices of a run."""
    out: dict = {}
    for row in chosen:
        for key, value in row.items():
            if key in ("fold", "store"):
                continue
            counts = out.setdefault(key, {})
            counts[str(value)] = counts.get(str(value), 0) + 1
    return out


def _spread(counts: dict) -> str:
    """``{"120": 2, "80": 1}`` (value: folds) -> ``"80 to 120 (median 120)"``."""
    values = sorted(float(v) for v, n in counts.items() for _ in range(n))
    lo, hi, median = (f"{x:g}" for x in (values[0], values[-1], float(np.median(values))))
    return lo if lo == hi else f"{lo} to {hi} (median {median})"


def _store_methods(name: str, config: dict, unnormalised: list, paths=()) -> dict:
    from features.augment import crop_sides

    stain = config.get("stain") or None
    whole = config.get("mode") == "whole" or not config.get("crop_size")
    return {
        "name": name,
        "backbone": config.get("backbone"),
        "weights": config.get("weights"),
        "weights_sha256": config.get("weights_sha256"),
        "stain": None if stain is None else {
            "method": stain.get("method", "macenko"),
            "reference": stain.get("reference"),
            "reference_sha256": stain.get("reference_sha256"),
        },
        "unnormalised": unnormalised,
        **{key: config.get(key) for key in ("augmentations", "color_gain", "color_shift", "crops", "crop_size",
                                             "scale", "mode", "pooling", "precision", "seed", "batch_size")},
        "instances": config.get("instances", "none"),
        # Absent from configs made before the option: the rgb augmentation.
        "color_augmentation": config.get("color_augmentation", "rgb"),
        "hed_sigma": config.get("hed_sigma"),
        "crop_sides": [] if whole else crop_sides(paths, config["crop_size"], config.get("scale", 1.0)),
        "config_hash": config.get("config_hash"),
        "versions": config.get("versions") or {},
    }


def _colour_words(store: dict) -> str:
    """What the colour augmentation of a store did, for the Methods paragraph."""
    if store.get("color_augmentation", "rgb") == "hed":
        sigma = store.get("hed_sigma")
        return (f"an affine transform of each stain's concentration (haematoxylin, eosin and DAB separated "
                f"by colour deconvolution with Ruifrok and Johnston's matrix in optical density), gain drawn "
                f"from 1 ± {sigma} and shift from ± {sigma} (Tellez et al. 2019)")
    return (f"an affine transform of each RGB channel's intensities, contrast gain drawn from "
            f"1 ± {store.get('color_gain')} around mid-grey and shift from ± {store.get('color_shift')} levels")


def describe_methods(result, command: str | None = None) -> dict:
    """Everything the Methods section states, JSON-ready.

    Parameters
    ----------
    result : CVResult
    command : str, optional
        The command line that produced the report (:func:`command_line`); ``None`` when the
        report was made from Python.

    Returns
    -------
    dict
        ``data``, ``extraction`` (one entry per store), ``classifiers``, ``cross_validation``,
        ``versions``, ``command``.
    """
    dataset, config = result.dataset, result.config
    images = dataset.images
    notes = images["stain_note"] if "stain_note" in images else None
    paths = list(images["path"]) if "path" in images else []
    unnormalised = ([] if notes is None else
                    [{"image_id": i, "reason": r} for i, r in zip(images["image_id"], notes) if r])
    classifiers = []
    for clf in config.classifiers:
        chosen = [p for run in result.runs if run.spec.classifier == clf for p in getattr(run, "chosen_params", [])]
        classifiers.append({
            "name": clf,
            "words": (f"the two-stage CNN of Nazeri et al. (2018), {two_stage_training_words(result.two_stage.get('config'))} "
                      "(its configuration is in the report's two-stage section)"
                      if clf == "two_stage" and getattr(result, "two_stage", None) else _CLASSIFIER_WORDS.get(clf, clf)),
            "params": _classifier_params(clf),
            "tuned": bool(config.tune) and clf in PARAM_GRIDS,
            "grid": {k.rsplit("__", 1)[-1]: v for k, v in PARAM_GRIDS.get(clf, {}).items()} if config.tune else {},
            "chosen": _chosen_summary(chosen),
        })
    groups_per_class = images.groupby("label")["group"].nunique()
    n_groups = int(images["group"].nunique())
    device = result.device
    return {
        "data": {
            "scheme": dataset.scheme,
            "classes": list(dataset.classes),
            "n_images": int(len(images)),
            "n_groups": n_groups,
            "groups_are_patients": n_groups < len(images),
            "images_per_class": {c: int((images["label"] == c).sum()) for c in dataset.classes},
            "groups_per_class": {c: int(groups_per_class.get(c, 0)) for c in dataset.classes},
            "augmented_rows": int(len(dataset.meta)),
        },
        "extraction": [_store_methods(name, cfg, unnormalised if i == 0 else [], paths)
                       for i, (name, cfg) in enumerate(zip(dataset.store_names, dataset.store_configs))],
        "classifiers": classifiers,
        "fusion": list(config.fusion) if len(dataset.store_names) > 1 else [],
        "cross_validation": {
            "n_folds": config.n_folds,
            "splitter": "scikit-learn StratifiedGroupKFold (shuffled)",
            "fold_seed": config.seed,
            "classifier_seed": config.seed,
            "voting": _VOTING,
            "xgboost_device": None if device is None else device.device,
        },
        "versions": software_versions(),
        "command": command,
    }


def _words(name: str) -> str:
    return _BACKBONE_WORDS.get(str(name), str(name))


def _sampling(store: dict) -> str:
    scale = store.get("scale")
    if store.get("mode") == "whole":
        cells = store.get("instances", "none")
        kept = ("" if cells in (None, "none") else
                f", and its feature map was also averaged over each cell of a {cells[len('cells-'):]} grid "
                "(cells along the longer side first): the instances of the multiple-instance classifier, whose "
                "mean is the image's feature vector")
        return f"the whole augmented image, resized by {scale}, was passed through the network{kept}"
    shared = (" (the network ran once per augmented image and each crop's window of its feature map "
              "was average-pooled)" if store.get("mode") == "shared" else "")
    sides, size = store.get("crop_sides") or [], store.get("crop_size")
    if sides == [size]:
        crop = f"{size} px"
    elif sides:
        real = f"{sides[0]}" if len(sides) == 1 else f"{sides[0]} to {sides[-1]}"
        crop = f"{real} px ({size} px capped at the shorter side of the resized image)"
    else:
        crop = f"{size} px (or the shorter image side when smaller)"
    return (f"{store.get('crops')} random square crops of {crop} were taken from each augmented image "
            f"after resizing by {scale}{shared}, "
            f"and their features were {store.get('pooling')}-pooled into one vector per augmented image")


def _stain_sentence(store: dict) -> str:
    stain = store.get("stain")
    if not stain:
        return "Images were not stain-normalised."
    text = (f"Images were stain-normalised with the Macenko method to the reference image "
            f"{stain.get('reference')} (sha256 {str(stain.get('reference_sha256'))[:12]}…)")
    left = store.get("unnormalised") or []
    if left:
        reasons = sorted({r["reason"] for r in left})
        text += (f"; {len(left)} image(s) were left unnormalised because Macenko's stain estimate failed on "
                 f"them ({'; '.join(reasons[:3])})")
    return text + "."


def methods_paragraph(methods: dict) -> str:
    """A Methods paragraph in plain English from :func:`describe_methods`, ready to paste."""
    data, cv, versions = methods["data"], methods["cross_validation"], methods["versions"]
    per_class = ", ".join(f"{n} {display_name(c)}" for c, n in data["images_per_class"].items())
    groups = (f" from {data['n_groups']} patients" if data["groups_are_patients"] else "")
    sentences = [f"We classified {data['n_images']} H&E images{groups} ({per_class}) into "
                 f"{len(data['classes'])} classes ({data['scheme']} scheme)."]
    for store in methods["extraction"]:
        sha = store.get("weights_sha256")
        weights = (f"ImageNet weights (sha256 {sha[:12]}…)" if store.get("weights") == "imagenet" and sha
                   else f"weights {store.get('weights')}" + (f" (sha256 {sha[:12]}…)" if sha else ""))
        sentences.append(
            f"{_stain_sentence(store)} Each image gave {store.get('augmentations')} colour augmentations "
            f"(the first the identity; the others {_colour_words(store)}, seeded from the image and "
            f"augmentation index with root seed {store.get('seed')}); {_sampling(store)}. Features came from {_words(store.get('backbone'))} "
            f"with {weights}, computed in {store.get('precision')}.")
    if methods.get("fusion"):
        sentences.append(f"The stores' features were combined by {' and by '.join(methods['fusion'])} fusion.")
    for clf in methods["classifiers"]:
        params = ", ".join(f"{k} = {v}" for k, v in clf["params"].items())
        text = f"The classifier was {clf['words']}" + (f", with {params}" if params else "")
        if clf["tuned"]:
            grid = "; ".join(f"{k} in {v}" for k, v in clf["grid"].items())
            chosen = "; ".join(f"{k}: " + ", ".join(f"{v} in {n} fold(s)" for v, n in counts.items())
                               for k, counts in clf["chosen"].items())
            text += (f"; {grid} chosen inside each training fold by a grouped 3-fold inner "
                     f"cross-validation" + (f" (chosen {chosen})" if chosen else ""))
        elif clf["chosen"]:  # no grid: what early stopping kept (--tune reports it)
            text += "".join(f"; early stopping kept {_spread(counts)} {key} over the training folds"
                            for key, counts in clf["chosen"].items())
        sentences.append(text + ".")
    sentences.append(
        f"Performance was estimated by {cv['n_folds']}-fold stratified cross-validation grouped by "
        f"{'patient' if data['groups_are_patients'] else 'image'} (all augmentations of an image"
        f"{' and all images of a patient' if data['groups_are_patients'] else ''} in one fold; fold seed "
        f"{cv['fold_seed']}); {cv['voting']}. 95% confidence intervals are percentile bootstrap intervals "
        f"over {'patients' if data['groups_are_patients'] else 'images'} (1000 resamples).")
    stated = ", ".join(f"{n} {versions[n]}" for n in _VERSION_NAMES if versions.get(n))
    sentences.append(f"Software: Python {versions.get('python')}, {stated}.")
    return " ".join(sentences)
