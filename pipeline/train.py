"""``python -m pipeline.train``: fit the final model on all images of feature stores and save it.

::

    python -m pipeline.train --features STORE_DIR [STORE_DIR ...] --out MODEL_DIR \\
        [--labels auto|classes|bach4|...|MAPPING.json] [--regroup MAPPING.json] [--magnification 40 ...] \\
        [--classifier xgboost|logreg|logreg-sqrt|xgboost-es|lightgbm] [--fusion concat|mean-proba] \\
        [--seed S] [--n-jobs 2] [--device auto|cpu|cuda] [--dask SCHEDULER_ADDRESS|local:N] \\
        [--exclude IMAGE_ID ...] [--tune] [--preset NAME] [--overwrite]

The model is the one ``pipeline.cv_report`` evaluates (same classifier, defaults and fusion),
fitted on every image.  The model directory holds only data (JSON, ``.npz``, LightGBM's text
trees) plus the
stores' extraction configs, so ``pipeline.predict`` can reproduce the features of new images
(see :mod:`classifiers.feature.model_io`).  ``--dask`` trains XGBoost with ``xgboost.dask`` on a
``dask.distributed`` cluster (:mod:`classifiers.feature.dask_xgboost`); the model directory is the same.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline._common import HelpFormatter, run  # first: sets passive OpenMP waiting before XGBoost loads
from pipeline._common import add_labels_option
from classifiers.evaluation.cross_validation import FUSION_CHOICES
from classifiers.feature.estimators import CLASSIFIER_NAMES, DEVICE_CHOICES
from classifiers.feature.presets import PRESET_NAMES, get_preset
from features.config import ExtractionConfig

log = logging.getLogger("pipeline.train")
PROG = "python -m pipeline.train"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fit the final classifier on all images of one or more feature stores and save "
        "it as a model directory (data files only: JSON, .npz, LightGBM text) for python -m pipeline.predict.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--features", nargs="+", required=True, metavar="STORE_DIR",
                   help="feature store directories (several = several backbones of the same images)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to create")
    add_labels_option(p)
    p.add_argument("--magnification", nargs="+", metavar="MAG",
                   help="train on the images of these magnifications only (BreakHis: 40 100 200 400)")
    p.add_argument("--classifier", default=None, choices=CLASSIFIER_NAMES, help="classifier (default xgboost)")
    p.add_argument("--fusion", default=None, choices=FUSION_CHOICES,
                   help="with several stores: concatenate features, or average per-store models' "
                   "probabilities (default concat)")
    p.add_argument("--tune", action="store_true",
                   help="choose the hyper-parameters by an inner grouped 3-fold CV of the training images "
                   "(xgboost-es and lightgbm choose their rounds by early stopping either way)")
    p.add_argument("--preset", choices=PRESET_NAMES,
                   help="a documented configuration's classifier, fusion and tuning, on its stores found "
                   "under --features (the root pipeline.extract --preset wrote)")
    p.add_argument("--seed", type=int, default=0, help="classifier seed")
    p.add_argument("--n-jobs", type=int, default=2, help="XGBoost and LightGBM threads")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="XGBoost training device")
    p.add_argument("--dask", metavar="SCHEDULER_ADDRESS",
                   help="train XGBoost with xgboost.dask on a dask.distributed cluster (tcp://HOST:PORT), "
                   "or 'local:N' to start N worker processes here; each worker trains with its own threads")
    p.add_argument("--exclude", nargs="+", default=[], metavar="IMAGE_ID",
                   help="leave these images (store ids, e.g. invasive/iv063.jpg) out of training, "
                   "to try the model on them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    return p


def main(argv=None) -> int:
    """Train and save; returns 0, or 2 with a message on bad input."""
    from classifiers.feature.estimators import DeviceUnavailableError

    return run(build_parser(), train, argv, errors=(DeviceUnavailableError,))


def train(args) -> int:
    """Fit on every image of the stores, save the model directory, print what was done."""
    from classifiers import FeatureModel, TrainConfig, load_features
    from classifiers.feature.model_io import check_model_out
    from classifiers.feature.presets import select_stores
    from features.store import exclude_images, load_store

    preset = get_preset(args.preset) if args.preset else None
    config = TrainConfig(scheme=args.labels,
                         classifier=args.classifier or (preset.classifier if preset else "xgboost"),
                         fusion=args.fusion or (preset.fusion if preset else "concat"),
                         seed=args.seed, n_jobs=args.n_jobs, device=args.device,
                         tune=args.tune or bool(preset and preset.tune))
    config.validate()
    if args.dask and config.classifier != "xgboost":
        raise ValueError(f"--dask trains xgboost only; train {config.classifier} without --dask")
    if args.dask and config.tune:
        raise ValueError("--tune is not available with --dask; tune on one machine or drop --tune")
    check_model_out(args.out, overwrite=args.overwrite)  # before any work
    paths = select_stores(preset, args.features) if preset else args.features
    dataset = load_features([exclude_images(load_store(path), args.exclude) for path in paths], config.scheme,
                            regroup=args.regroup, magnification=args.magnification)
    model = FeatureModel(config)
    if args.dask:
        from features.distributed import dask_client

        with dask_client(args.dask) as client:
            model.fit(dataset, client=client)
    else:
        model.fit(dataset)
    out = model.save(args.out, overwrite=args.overwrite)
    paths = list(dataset.images["path"]) if "path" in dataset.images else []
    print(report(model.trained, out, paths))
    if args.exclude:
        print(f"left out of training: {', '.join(args.exclude)}")
    return 0


def sampling(config: ExtractionConfig, paths=()) -> str:
    """What the backbone saw per augmentation, with the crop side the images really got."""
    from features.augment import crop_sides

    text = config.sampling
    sides = [] if config.mode == "whole" else crop_sides(paths, config.crop_size, config.scale)
    if sides and sides != [config.crop_size]:
        real = f"{sides[0]}" if len(sides) == 1 else f"{sides[0]}-{sides[-1]}"
        text = text.replace(f"crops of {config.crop_size} px",
                            f"crops of {real} px ({config.crop_size} capped at the scaled image side)")
    return text


def report(model, out, paths=()) -> str:
    """What was trained, on what (``paths``: the training images, for the real crop side), and
    where it went."""
    t = model.training
    per_class = ", ".join(f"{c} {n}" for c, n in t["images_per_class"].items())
    stores = ", ".join(
        f"{name} ({cfg.get('backbone')}, {dim} features, {sampling(ExtractionConfig.from_dict(cfg), paths)})"
        for name, cfg, dim in zip(model.store_names, model.store_configs, model.feature_dims)
    )
    lines = [
        f"model: {model.fitted.spec.name} ({model.classifier}, fusion {model.fusion}), scheme {model.scheme}",
        *([f"hyper-parameters chosen by inner CV: {t['chosen_params']}"] if "chosen_params" in t else []),
        f"trained on {t['n_images']} images ({per_class}), {t['n_rows']} augmentation rows"
        + (f", on {t['dask_workers']} dask workers" if "dask_workers" in t else ""),
        f"stores: {stores}",
    ]
    if model.groupings:
        lines.append("predict also reports: " + "; ".join(f"{g['name']} ({', '.join(g['classes'])})"
                                                          for g in model.groupings))
    if model.absent_classes:
        lines.append(f"classes without images (never predicted): {', '.join(model.absent_classes)}")
    lines.append(f"saved to {out}; estimate its accuracy with python -m pipeline.cv_report, not on these images")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
