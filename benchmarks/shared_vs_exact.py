"""Shared feature maps vs exact per-crop extraction, measured in one run.

Prints, for one backbone: crops per second of both modes, the cosine similarity between the
exact and the shared feature of the same crops, and the grouped-CV accuracy of stores extracted
in each mode (mean +- sd over fold seeds).  Usage::

    python benchmarks/shared_vs_exact.py --data ../shared/datasets/bach-dev --out runs/bench-shared
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pipeline/cv_report.py

import numpy as np

from classifiers import CVConfig, build_dataset, run_cross_validation
from classifiers.evaluation.report import summarize
from data.datasets import load_dataset
from data.io import read_image
from features.augment import ColorAugmentation, draw_augmentation
from features.extract import FeatureExtractor, extract_to_store, make_config
from features.feature_maps import pool_windows
from features.stain import StainNormalizer
from features.store import load_store
from features.transforms import scale_image


def crop_level(config, dataset, n_images: int, batch_size: int) -> dict:
    """Exact vs shared features of the very same crops, and the time each mode takes."""
    extractor = FeatureExtractor(config, batch_size=batch_size)
    normalizer = StainNormalizer.from_params(config.stain) if config.stain else None
    color = ColorAugmentation(config.color_gain, config.color_shift)
    rows = dataset.iloc[np.linspace(0, len(dataset) - 1, n_images).round().astype(int)]
    cosines, t_exact, t_shared, n_crops = [], 0.0, 0.0, 0
    for row in rows.itertuples(index=False):
        image = scale_image(read_image(row.path), config.scale)
        if normalizer is not None:
            image, _ = normalizer.transform_or_keep(image)
        draws = [draw_augmentation(seed=config.seed, image_id=row.image_id, aug_index=a,
                                   height=image.shape[0], width=image.shape[1],
                                   n_crops=config.crops, crop_size=config.crop_size, color=color)
                 for a in range(config.augmentations)]
        augmented = [color.apply(image, d.gain, d.shift) for d in draws]
        start = time.perf_counter()
        crops = np.concatenate([
            np.stack([img[y:y + d.side, x:x + d.side] for y, x in d.positions])
            for img, d in zip(augmented, draws)])
        exact = extractor.features(crops)
        t_exact += time.perf_counter() - start
        start = time.perf_counter()
        shared = []
        for i in range(0, len(augmented), batch_size):
            maps = extractor.feature_maps(np.stack(augmented[i:i + batch_size]))
            shared += [pool_windows(m, d.windows, extractor.spec.stride)
                       for m, d in zip(maps, draws[i:i + batch_size])]
        shared = np.concatenate(shared)
        t_shared += time.perf_counter() - start
        cosines.append((exact * shared).sum(1)
                       / (np.linalg.norm(exact, axis=1) * np.linalg.norm(shared, axis=1)))
        n_crops += len(crops)
    cos = np.concatenate(cosines)
    return {"crops": n_crops, "exact_crops_per_s": n_crops / t_exact,
            "shared_crops_per_s": n_crops / t_shared, "speedup": t_exact / t_shared,
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "cosine_p05": float(np.percentile(cos, 5))}


def cv_accuracy(store, schemes, classifiers, seeds) -> dict:
    table = load_store(store)
    out = {}
    for scheme in schemes:
        dataset = build_dataset([table], scheme)
        for seed in seeds:
            result = run_cross_validation(dataset, CVConfig(scheme=scheme, seed=seed,
                                                            classifiers=tuple(classifiers)))
            for name, run in summarize(result)["runs"].items():
                out.setdefault(f"{scheme}/{name}", []).append(run["majority"]["accuracy"])
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, v)
            for k, v in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/datasets/bach-dev")
    p.add_argument("--out", type=Path, default=Path("runs/bench-shared"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--augmentations", type=int, default=8)
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=750)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop-sample", type=int, default=8, help="images for the crop-level check")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fold seeds")
    p.add_argument("--schemes", nargs="+", default=["bach4", "binary"])
    p.add_argument("--classifiers", nargs="+", default=["logreg", "xgboost"])
    p.add_argument("--crop-level-only", action="store_true",
                   help="only the same-crops speed and cosine check, no stores and no CV")
    args = p.parse_args(argv)

    dataset = load_dataset(args.data)
    exact = make_config(dataset, backbone=args.backbone, weights=args.weights,
                        augmentations=args.augmentations, crops=args.crops,
                        crop_size=args.crop_size, scale=args.scale)
    shared = replace(exact, mode="shared")
    results = {"crop_level": crop_level(exact, dataset, args.crop_sample, args.batch_size)}
    print(json.dumps(results["crop_level"], indent=2), flush=True)
    if args.crop_level_only:
        return
    for config in (exact, shared):
        summary = extract_to_store(dataset, config, args.out, batch_size=args.batch_size,
                                   progress=False)
        results[config.mode] = {
            "store": str(summary.store_path), "images_extracted": len(summary.done),
            "crops_per_s": summary.crops_per_second if summary.done else None,
            "cv": cv_accuracy(summary.store_path, args.schemes, args.classifiers, args.seeds),
        }
        print(config.mode, json.dumps(results[config.mode], indent=2), flush=True)
    (args.out / "shared_vs_exact.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'':28s}{'exact':>16s}{'shared':>16s}")
    for key in results["exact"]["cv"]:
        e, s = results["exact"]["cv"][key], results["shared"]["cv"][key]
        print(f"{key:28s}{e[0]:>10.3f} +-{e[1]:.3f}{s[0]:>10.3f} +-{s[1]:.3f}")
    c = results["crop_level"]
    print(f"crops/s (same crops): exact {c['exact_crops_per_s']:.2f}, shared "
          f"{c['shared_crops_per_s']:.2f}, speed-up {c['speedup']:.1f}x; cosine mean "
          f"{c['cosine_mean']:.4f}, 5th percentile {c['cosine_p05']:.4f}, min {c['cosine_min']:.4f}")


if __name__ == "__main__":
    main()
