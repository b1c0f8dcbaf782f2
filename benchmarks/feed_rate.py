"""Feed rate: images per second the host side delivers, against the backbone's rate here.

With a null backbone (the prepared items are consumed and dropped), runs the image side of
``pipeline.extract`` exactly as the library runs it (:func:`features.extract.iter_host_items`:
decode, resize, Macenko in ``--workers`` processes, then the per-augmentation items the
backbone would get) on ``--images`` images for each worker count, and prints the images per
second it delivers.  Then it times the backbone alone on this device (``FeatureExtractor``:
``--backbone-images`` whole images in shared mode, or the crops of a few batches in exact mode,
extrapolated) and says which side bounds a run: on a GPU machine the same command tells where
the time goes.

Images: ``--data`` (default ``../shared/datasets/bach-dev`` from the repository root) when it
exists, else synthetic H&E images of ``--synthetic-size`` (``data.synthetic``).  The Macenko
reference is fitted once, before timing (``--stain-reference auto``).  Usage::

    python benchmarks/feed_rate.py [--workers 1 2] [--images 8] [--mode shared] \\
        [--augmentations 40 --crops 20 --crop-size 750 --scale 0.5] [--json runs/feed.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def host_rate(rows, config, workers: int) -> dict:
    """Images/s the image side delivers with ``workers`` processes (null backbone).

    ``startup_s`` is the time to the first finished image (worker start-up, first decode);
    ``images_per_s`` the rate over the images after it, the rate of a long run.
    """
    from features.extract import iter_host_items

    start = time.perf_counter()
    finished, first = 0, None
    for item in iter_host_items(rows, config, workers=workers):
        if item[0] in ("end", "error"):
            finished += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    rest = end - first
    return {"workers": workers, "images": finished, "seconds": end - start,
            "startup_s": first - start,
            "images_per_s": (finished - 1) / rest if finished > 1 and rest > 0 else float("nan")}


def backbone_rate(config, image_hw, batch_size: int, images: int) -> dict:
    """Images/s of the extractor's graph alone on this device (colour augmentation, crops,
    backbone and pooling; ``features.extract.PooledImage``), on one prepared synthetic image.
    In exact mode a few batches are timed and extrapolated to the image's crops."""
    import numpy as np

    from data.synthetic import make_image
    from features.extract import PooledImage, Preprocessing, make_extractor
    from features.image_side import image_items

    extractor = make_extractor(config, batch_size=batch_size)
    prep = Preprocessing.from_config(config)
    image = make_image("invasive", np.random.default_rng(0), size=tuple(image_hw))
    row = type("Row", (), {"image_id": "bench", "path": ""})()
    items = [i for i in image_items(row, ("image", image, None), config, prep) if i[0] == "aug"]
    exact = config.mode == "exact"
    # Exact mode: whole batches of crops (enough augmentations for 3), extrapolated to the
    # image's crops; a whole image is minutes of CPU at 750 px.
    per_batch = -(-batch_size // config.crops)  # augmentations filling one batch
    if exact:
        items = items[: 3 * per_batch]

    def run(some) -> int:
        pooled = PooledImage(config, extractor)
        pooled.set_image(image)
        for item in some:
            pooled.add(item[2])
        if not exact:
            pooled.finish()
        return len(some) * config.crops // batch_size * batch_size  # crops run (exact)

    run(items[:per_batch] if exact else items[:1])  # trace and warm up
    start = time.perf_counter()
    for _ in range(images):
        crops_run = run(items)
    seconds = (time.perf_counter() - start) / images
    if exact:
        seconds *= config.augmentations * config.crops / crops_run
    return {"device": extractor.device, "seconds_per_image": seconds,
            "images_per_s": 1.0 / seconds}


def bound(host: float, backbone: float) -> str:
    """Which side limits a run, and how idle the other one is."""
    if host >= backbone:
        return f"the backbone bounds the run (the image side would idle {100 * (1 - backbone / host):.0f} %)"
    return f"the image side bounds the run (the backbone would idle {100 * (1 - host / backbone):.0f} %)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "bach-dev"),
                   help="class-folder data set or CSV manifest; synthetic images when missing")
    p.add_argument("--images", type=int, default=8, help="images per worker count")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help="'imagenet', a file, or 'none'")
    p.add_argument("--mode", default="shared", choices=["exact", "shared", "whole"])
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engine", default="keras", choices=["keras", "openvino"],
                   help="what runs the backbone (features.extract.make_extractor)")
    p.add_argument("--augmentations", type=int, default=40)
    p.add_argument("--crops", type=int, default=20)
    p.add_argument("--crop-size", type=int, default=750)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stain-reference", default="auto", choices=["auto", "none"])
    p.add_argument("--backbone-images", type=int, default=1,
                   help="whole images timed for the backbone rate (shared/whole mode)")
    p.add_argument("--no-backbone", action="store_true", help="skip the backbone timing")
    p.add_argument("--synthetic-size", type=int, nargs=2, default=[1536, 1536], metavar=("H", "W"))
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    import numpy as np

    from data.datasets import load_dataset
    from data.synthetic import write_dataset
    from features.backbones import WeightsNotFoundError
    from features.extract import make_config
    from features.transforms import scale_image
    from data.io import read_image

    with tempfile.TemporaryDirectory() as tmp:
        if Path(args.data).exists():
            dataset, source = load_dataset(args.data), args.data
        else:
            per_class = -(-args.images // 4)
            source = f"synthetic {args.synthetic_size[0]}x{args.synthetic_size[1]}"
            dataset = load_dataset(write_dataset(Path(tmp), n_per_class=per_class,
                                                 size=tuple(args.synthetic_size), fmt="jpg"))
        picks = np.unique(np.linspace(0, len(dataset) - 1, args.images).round().astype(int))
        frame = dataset.iloc[picks]
        options = dict(augmentations=args.augmentations, crops=args.crops, crop_size=args.crop_size,
                       scale=args.scale, mode=args.mode, precision=args.precision, engine=args.engine,
                       batch_size=args.batch_size)
        if args.mode == "whole":
            options.update(crops=1, crop_size=0)
        start = time.perf_counter()
        try:
            config = make_config(frame, backbone=args.backbone, weights=args.weights,
                                 stain_reference=args.stain_reference, **options)
        except WeightsNotFoundError:
            config = make_config(frame, backbone=args.backbone, weights="none",
                                 stain_reference=args.stain_reference, **options)
        fit_s = time.perf_counter() - start
        rows = list(frame.itertuples(index=False))
        image_hw = scale_image(read_image(rows[0].path), args.scale).shape[:2]
        print(f"feed rate: {config.sampling}, {config.mode}, {len(rows)} images of {source} "
              f"({image_hw[0]}x{image_hw[1]} after scaling), stain {args.stain_reference} "
              f"(reference fit {fit_s:.1f} s, not timed); {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        results = {"config": config.to_dict(), "source": source, "images": len(rows),
                   "load_average_1min": os.getloadavg()[0], "host": []}
        print(f"{'workers':>7s} {'images/s':>9s} {'s/image':>8s} {'start-up s':>10s}", flush=True)
        for n in args.workers:
            r = host_rate(rows, config, n)
            results["host"].append(r)
            print(f"{n:7d} {r['images_per_s']:9.3f} {1 / r['images_per_s']:8.3f} "
                  f"{r['startup_s']:10.2f}", flush=True)
    if not args.no_backbone:
        b = backbone_rate(config, image_hw, args.batch_size, args.backbone_images)
        results["backbone"] = b
        print(f"backbone {config.backbone} ({config.weights} weights, {config.precision}) on "
              f"{b['device']}: {b['images_per_s']:.3f} images/s ({b['seconds_per_image']:.2f} "
              f"s/image)")
        for r in results["host"]:
            line = bound(r["images_per_s"], b["images_per_s"])
            r["bound"] = line
            print(f"  {r['workers']} worker(s): {line}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        from results import write_json

        write_json(args.json, results)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the packages, also from a source tree that is not installed
    main()
