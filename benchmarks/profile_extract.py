"""Where extraction time goes: each stage of one config, timed separately on a few images.

Runs the library's own functions one stage at a time, serially, on ``--images`` images spread
over ``--data`` and prints seconds and % of the per-image total for each stage:

decode (``data.io.read_image``), resize (``features.transforms.scale_image``), Macenko transform
(``features.extract.Preprocessing``),
augmentation draws and colour tables (``features.image_side.image_items``), the compiled graph
that colours, crops, runs the backbone and pools (``features.extract.PooledImage``), source file
hash and store write (``features.store``).  One-off costs (backbone build, Macenko
reference fit, graph tracing) are printed apart.

``pipeline.extract`` runs decode to the augmentation draws beside the backbone (a producer
thread, or ``--workers`` processes for decode and Macenko), so its time per image lies between
the larger of the two sides and their sum; both are printed.
Usage::

    python benchmarks/profile_extract.py [--data ../shared/datasets/bach-dev] [--images 4] \\
        [--backbone efficientnet_lite0] [--mode exact] [--crop-size 750]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

class StageTimer:
    """Wall time accumulated per named stage, in the order the stages first ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def profile(frame, config, *, batch_size: int, fit_reference: bool, store_root: Path) -> dict:
    """Time every stage of extracting the images of ``frame`` with ``config``.

    Parameters
    ----------
    frame : the images to extract (``data.datasets.load_dataset`` rows).
    config : a resolved :class:`features.config.ExtractionConfig` with ``stain=None``.
    batch_size : crops (exact) or augmented images (shared) per forward pass.
    fit_reference : fit the Macenko reference on ``frame`` (``fit_stain_reference``), as
        ``--stain-reference auto`` does on the data set.
    store_root : where the feature store is written.

    Returns
    -------
    dict with ``one_off`` and ``per_image`` seconds per stage, and the config used.
    """
    import numpy as np

    from data.io import read_image
    from features.augment import effective_crop_size
    from data.files import file_sha256
    from features.extract import PooledImage, Preprocessing, make_extractor, write_image_record
    from features.image_side import image_items
    from features.stain import fit_stain_reference
    from features.transforms import scale_image
    from features.store import FeatureStore

    rows = list(frame.itertuples(index=False))
    one_off, stage = StageTimer(), StageTimer()
    if fit_reference:
        with one_off("Macenko reference fit (decodes its candidates)"):
            config = replace(config, stain=fit_stain_reference(frame, config.scale))
    with one_off("backbone build (FeatureExtractor)"):
        extractor = make_extractor(config, batch_size=batch_size)
    with one_off("store open (features.store)"):
        store = FeatureStore(store_root, config).open()
    prep = Preprocessing.from_config(config)

    # Trace the graph on the first image's shape outside the per-image timing.
    first = scale_image(read_image(rows[0].path), config.scale)
    h, w = first.shape[:2]
    side = effective_crop_size(h, w, config.crop_size)
    with one_off("graph trace + warm-up"):
        image = extractor.to_device(np.zeros((h, w, 3), np.uint8))
        luts = np.zeros((1, 256, 3), np.uint8)
        if config.mode == "shared":
            size = min(batch_size, config.augmentations)  # PooledImage's padded batch
            extractor.augmented_pooled(image, luts, np.tile([[0, 0, side]], (1, config.crops, 1)),
                                       config.pooling, size)
        else:
            extractor.crop_features(image, luts, np.array([[0, 0, side]]))

    notes = []
    wall = time.perf_counter()
    for row in rows:
        with stage("decode"):
            image = read_image(row.path)
        with stage("resize"):
            image = scale_image(image, config.scale)
        note = None
        if prep.normalizer is not None:
            with stage("macenko"):
                image, note = prep.normalizer.transform_or_keep(image)
        notes.append(note)
        with stage("augment"):  # the draws and colour tables (features.image_side.image_items)
            items = list(image_items(row, ("image", image, note), config, prep))
        # Colour augmentation, crops and pooling run in the backbone's graph.
        with stage("backbone"):
            pooled = PooledImage(config, extractor)
            for item in items:
                if item[0] == "image":
                    pooled.set_image(item[1])
                elif item[0] == "aug":
                    pooled.add(item[2])
            features = pooled.finish()
        with stage("source hash"):
            source_sha256 = file_sha256(row.path)
        with stage("store write"):
            write_image_record(store, row, source_sha256, features, note)
    wall = time.perf_counter() - wall
    return {"config": config.to_dict(), "images": len(rows), "wall_seconds": wall,
            "one_off": one_off.seconds, "per_image": stage.seconds,
            "unnormalized": sum(n is not None for n in notes)}


def report(result: dict) -> list[str]:
    """The printed table: one-off costs, then per-image stages with their share."""
    labels = {
        "decode": "decode (data.io.read_image)",
        "resize": "resize (extract.scale_image)",
        "macenko": "Macenko transform",
        "augment": "augmentation draws + colour tables",
        "backbone": "graph: colour, crops, backbone, pooling",
        "augmentation pooling": "augmentation pooling",
        "source hash": "source sha256",
        "store write": "store write",
    }
    # The stages of pipeline.extract's producer thread; the others run in the main thread.
    image_stages = ("decode", "resize", "macenko", "augment")
    n = result["images"]
    lines = [f"{'one-off':48s} {'s':>8s}"]
    lines += [f"  {name:46s} {s:8.2f}" for name, s in result["one_off"].items()]
    total = sum(result["per_image"].values())
    lines.append(f"{f'per image ({n} images)':48s} {'s':>8s} {'%':>6s} {'s/image':>8s}")
    for name, s in result["per_image"].items():
        lines.append(f"  {labels.get(name, name):46s} {s:8.2f} {100 * s / total:5.1f}% "
                     f"{s / n:8.3f}")
    lines.append(f"  {'total of the stages':46s} {total:8.2f} {100.0:5.1f}% {total / n:8.3f}")
    other = result["wall_seconds"] - total
    lines.append(f"  {'untimed (loop overhead)':46s} {other:8.2f}")
    image_side = sum(s for k, s in result["per_image"].items() if k in image_stages)
    overlapped = max(image_side, total - image_side)
    lines.append(f"pipeline.extract overlaps the image side ({image_side / n:.3f} s/image) with "
                 f"the rest ({(total - image_side) / n:.3f} s/image): between "
                 f"{overlapped / n:.3f} and {total / n:.3f} s/image")
    if result["unnormalized"]:
        lines.append(f"{result['unnormalized']} image(s) kept unnormalised "
                     f"(Macenko could not apply)")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "bach-dev"),
                   help="class-folder data set or CSV manifest (default: ../shared/datasets/"
                   "bach-dev from the repository root)")
    p.add_argument("--images", type=int, default=4, help="images, spread over the data set")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help="'imagenet', a file, or 'none'")
    p.add_argument("--mode", default="exact", choices=["exact", "shared"])
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engine", default="keras", choices=["keras", "openvino"],
                   help="what runs the backbone (features.extract.make_extractor)")
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--augmentations", type=int, default=4)
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=750)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stain-reference", default="auto", choices=["auto", "none"],
                   help="'auto': fit the Macenko reference on the profiled images")
    p.add_argument("--json", type=Path, help="also write the timings to this JSON file")
    args = p.parse_args(argv)

    import numpy as np

    from data.datasets import load_dataset
    from features.extract import make_config

    dataset = load_dataset(args.data)
    picks = np.unique(np.linspace(0, len(dataset) - 1, args.images).round().astype(int))
    # The stain state is fitted inside profile(), so that its time is reported.
    config = make_config(backbone=args.backbone, weights=args.weights, stain_reference="none",
                         augmentations=args.augmentations, crops=args.crops,
                         crop_size=args.crop_size, scale=args.scale, mode=args.mode,
                         precision=args.precision, engine=args.engine)
    with tempfile.TemporaryDirectory() as tmp:
        result = profile(dataset.iloc[picks], config, batch_size=args.batch_size,
                         fit_reference=args.stain_reference == "auto", store_root=Path(tmp))
    c = result["config"]
    print(f"profile: {c['backbone']} ({c['weights']} weights), {c['mode']}, {c['precision']}, "
          f"scale {c['scale']:g}, {c['augmentations']} augmentations x {c['crops']} crops of "
          f"{c['crop_size']}, batch {args.batch_size}, stain {args.stain_reference}; "
          f"{result['images']} images of {args.data}")
    print("\n".join(report(result)), flush=True)
    if args.json:
        from results import write_json

        write_json(args.json, result)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the packages, also from a source tree that is not installed
    main()
