"""Backbone throughput against the machine's limit, and extraction time/memory vs data size.

In one run, prints a table a reader can compare between machines:

1. dense float32 matmul throughput of this machine through TensorFlow (GFLOP/s);
2. per backbone and extraction mode: crops per second at the crop size, FLOPs per crop
   (``benchmarks/flops.py``), achieved GFLOP/s and its fraction of the matmul figure, peak
   resident memory (each configuration in its own process, so peaks do not mix);
3. with ``--data``: wall time and peak memory of a full extraction of 1, 10 and all images
   (time should grow linearly, memory stay flat).

Weights are random (``weights=None``): speed does not depend on their values, and ResNet50 /
Xception ImageNet files need not be on the machine.  Usage::

    python benchmarks/backbone_throughput.py [--crop-size 750] [--data ../shared/datasets/bach-dev]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def matmul_gflops(n: int = 4096, repeats: int = 10) -> float:
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    b = tf.random.normal((n, n), dtype=tf.float32)
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))
    mm(a, b).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        mm(a, b).numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def measure_backbone(backbone: str, mode: str, crop_size: int, crops: int, batch_size: int,
                     image_hw: tuple[int, int], seconds: float) -> dict:
    """Crops/s of one backbone in one mode on random images (runs in a worker process)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from flops import count_flops

    from features.augment import crop_positions
    from features.backbones import get_backbone
    from features.config import ExtractionConfig
    from features.extract import FeatureExtractor, ImageBatcher, MapBatcher

    spec = get_backbone(backbone)
    flops = count_flops(spec.build(None, input_shape=(crop_size, crop_size, 3)))
    extractor = FeatureExtractor(
        ExtractionConfig(backbone=backbone, weights="none", crop_size=crop_size, mode=mode),
        batch_size=batch_size)
    rng = np.random.default_rng(0)
    h, w = image_hw
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def one_augmented_image() -> None:
        pos = crop_positions(rng, h, w, crop_size, crops)
        if mode == "shared":
            batcher = MapBatcher(extractor)
            batcher.add(image, np.column_stack([pos, np.full(crops, crop_size)]))
        else:
            batcher = ImageBatcher(extractor)
            batcher.add(np.stack([image[y:y + crop_size, x:x + crop_size] for y, x in pos]))
        batcher.finish()

    one_augmented_image()  # trace and warm up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        one_augmented_image()
        done += crops
    rate = done / (time.perf_counter() - start)
    return {"backbone": backbone, "mode": mode, "crop_size": crop_size, "crops_per_s": rate,
            "gflop_per_crop": flops / 1e9, "achieved_gflops": rate * flops / 1e9,
            "peak_rss_mb": peak_rss_mb()}


def measure_extraction(data: str, n_images: int, protocol: list[str]) -> dict:
    """A real ``pipeline.extract`` run on the first ``n_images`` images, in a fresh store."""
    import pandas as pd

    from data.datasets import load_dataset

    frame = load_dataset(data)
    picks = frame.iloc[:: max(1, len(frame) // n_images)].head(n_images)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "subset.csv"
        pd.DataFrame({"path": picks.path, "label": picks.label}).to_csv(manifest, index=False)
        cmd = [sys.executable, "-m", "pipeline.extract", "--data", str(manifest),
               "--out", str(Path(tmp) / "store"), "--quiet", *protocol]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images": len(picks), "seconds": seconds, "seconds_per_image": seconds / len(picks),
            "peak_rss_mb_of_largest_run_so_far": peak}


def _worker(argv) -> None:
    kwargs = json.loads(argv[0])
    print(json.dumps(measure_backbone(**kwargs)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["resnet50", "xception", "efficientnet_lite0"])
    p.add_argument("--modes", nargs="+", default=["exact", "shared"])
    p.add_argument("--crop-size", type=int, default=750)
    p.add_argument("--crops", type=int, default=20, help="crops per augmented image")
    p.add_argument("--image", type=int, nargs=2, default=[768, 1024], metavar=("H", "W"),
                   help="augmented image size (BACH scaled by 0.5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20, help="timing per configuration")
    p.add_argument("--data", help="a data set for the 1 / 10 / all images extraction runs")
    p.add_argument("--protocol", default="--augmentations 4 --crops 4",
                   help="extraction options for the --data runs")
    args = p.parse_args(argv)

    print(f"dense float32 matmul (TensorFlow, 4096^2): {matmul_gflops():.0f} GFLOP/s", flush=True)
    peak = matmul_gflops()
    rows = []
    for backbone in args.backbones:
        for mode in args.modes:
            kwargs = dict(backbone=backbone, mode=mode, crop_size=args.crop_size, crops=args.crops,
                          batch_size=args.batch_size, image_hw=tuple(args.image),
                          seconds=args.seconds)
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(kwargs)],
                                 cwd=ROOT, check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{backbone:20s} {mode:7s} {r['crops_per_s']:8.2f} crops/s  "
                  f"{r['gflop_per_crop']:6.1f} GFLOP/crop  {r['achieved_gflops']:7.1f} GFLOP/s "
                  f"({100 * r['achieved_gflops'] / peak:5.1f}% of matmul)  "
                  f"peak {r['peak_rss_mb']:6.0f} MB", flush=True)
    for backbone in args.backbones:
        by_mode = {r["mode"]: r for r in rows if r["backbone"] == backbone}
        if {"exact", "shared"} <= set(by_mode):
            print(f"{backbone}: shared / exact crops per second = "
                  f"{by_mode['shared']['crops_per_s'] / by_mode['exact']['crops_per_s']:.1f}x")
    if args.data:
        for n in (1, 10, 10**9):
            r = measure_extraction(args.data, n, args.protocol.split())
            print(f"extract {r['images']:4d} images: {r['seconds']:7.1f} s "
                  f"({r['seconds_per_image']:.2f} s/image), peak RSS so far "
                  f"{r['peak_rss_mb_of_largest_run_so_far']:.0f} MB", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        main()
