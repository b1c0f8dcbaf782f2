"""Backbone throughput against the machine's limit, and extraction time/memory vs data size.

In one run, prints a table a reader can compare between machines:

1. dense float32 matmul throughput of this machine through TensorFlow (GFLOP/s), measured once;
2. per backbone, extraction mode and precision (each in its own process, so memory peaks do not
   mix): crops per second, the GFLOP/s the backbone really computes (``benchmarks/flops.py``:
   per crop in exact mode, per whole augmented image in shared mode) and its fraction of the
   matmul figure, peak resident memory of the worker (``VmHWM``; it includes the prepared
   inputs of one image, 270 MB for 8 x 20 crops of 750), and the projected hours of the paper
   protocol (400 images x 40 augmentations x 20 crops) at that speed;
3. the ratios of issues #6 and #16, printed against their targets (never asserted): shared /
   exact crops/s, bfloat16 / float32 crops/s with the mean cosine between the bfloat16 and
   float32 features of the same crops and weights, float32 fraction of matmul; with
   ``--engines keras openvino``, each other engine's crops/s over the Keras float32 row of the
   same backbone and mode, with the cosine between their features of the same crops;
4. with ``--data``: wall time and peak memory of a full ``pipeline.extract`` run on 1, 10 and
   all images (time should grow linearly, memory stay flat).

The input is one synthetic H&E image (``data.synthetic``) of the augmented-image size, prepared
by the library (``features.augment``) before timing, so only the backbone is timed.  An image is
``--augmentations`` augmented copies batched as ``features.extract`` batches one image: with
the default 8 (= ``--batch-size``) neither mode runs zero-padded batches.  Weights are ImageNet
where the file is on the machine, else random init with the config's seed (the same in every
process, so the bfloat16 / float32 cosine compares the same network); the table says which.
Usage::

    python benchmarks/backbone_throughput.py [--crop-size 750] [--json runs/throughput.json] \\
        [--data ../shared/datasets/bach-dev]
    python benchmarks/backbone_throughput.py --backbones efficientnet_lite0 resnet50 --modes shared \
        --engines keras openvino      # the engines compared, interleaved in one run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Targets:
    """The targets of issue #6, raised by issue #16, printed beside the measurements (never
    asserted).

    Attributes
    ----------
    shared_speedup : shared / exact crops/s, for ``shared_backbones``.
    matmul_fraction : float32 achieved GFLOP/s / matmul GFLOP/s, for ``matmul_backbones`` (issue
        #6: 0.75; #16: 0.85 in both modes).
    bf16_speedup, bf16_cosine : bfloat16 / float32 crops/s and mean feature cosine.
    protocol_hours : wall time of the paper protocol below, in hours (#6: 2; #16: 1.5 in
        shared bfloat16).
    engine_speedup : crops/s of the fastest row of an engine / the Keras float32 row, same mode,
        for ``engine_backbones`` (#16: EfficientNet-Lite0 2x in shared mode).
    protocol_images, protocol_augmentations, protocol_crops : the paper protocol.
    """

    shared_speedup: float = 8.0
    shared_backbones: tuple = ("resnet50",)
    matmul_fraction: float = 0.85
    matmul_backbones: tuple = ("resnet50", "xception")
    bf16_speedup: float = 1.2
    bf16_cosine: float = 0.99
    protocol_hours: float = 1.5
    engine_speedup: float = 2.0
    engine_backbones: tuple = ("efficientnet_lite0",)
    protocol_images: int = 400
    protocol_augmentations: int = 40
    protocol_crops: int = 20


def matmul_gflops(n: int = 4096, repeats: int = 10) -> float:
    """Dense float32 ``n x n`` matmul throughput of this machine through TensorFlow."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    b = tf.random.normal((n, n), dtype=tf.float32)
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))
    mm(a, b).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        mm(a, b).numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def backbone_flops(backbone: str, crop_side: int, image_hw: tuple[int, int]) -> dict:
    """FLOPs of one forward pass on one crop and on one whole augmented image."""
    sys.path.insert(0, str(HERE))
    from flops import count_flops

    from features.backbones import get_backbone

    spec = get_backbone(backbone)
    return {"crop": count_flops(spec.build(None, input_shape=(crop_side, crop_side, 3))),
            "image": count_flops(spec.build(None, input_shape=(*image_hw, 3)))}


def resolve_config(backbone: str, weights: str, **options):
    """``make_config`` without stain normalisation; random init when the weights are missing.

    Random init uses the config's seed, so every process builds the same network.
    """
    from features.backbones import WeightsNotFoundError
    from features.extract import make_config

    try:
        return make_config(backbone=backbone, weights=weights, stain_reference="none", **options)
    except WeightsNotFoundError:
        return make_config(backbone=backbone, weights="none", stain_reference="none", **options)


def measure_backbone(backbone: str, mode: str, precision: str, weights: str, crop_size: int,
                     crops: int, augmentations: int, batch_size: int, image_hw: tuple[int, int],
                     seconds: float, features_out: str, engine: str = "keras") -> dict:
    """Crops/s of one backbone, mode and precision (runs in a worker process).

    Times whole images (``augmentations`` augmented copies each) for at least ``seconds``, and
    saves the crop features of the first timed image to ``features_out`` (``.npy``), which are
    the same crops in every process.
    """
    import numpy as np

    from data.synthetic import make_image
    from features.augment import ColorAugmentation, augmented_crops, draw_augmentation
    from features.extract import ImageBatcher, MapBatcher, make_extractor

    config = resolve_config(backbone, weights, crop_size=crop_size, crops=crops,
                            augmentations=augmentations, mode=mode, precision=precision,
                            engine=engine)
    extractor = make_extractor(config, batch_size=batch_size)
    image = make_image("invasive", np.random.default_rng(0), size=tuple(image_hw))
    color = ColorAugmentation(config.color_gain, config.color_shift)
    h, w = image.shape[:2]
    # The inputs of one image, prepared as features.extract prepares them, outside the timing.
    if mode == "shared":
        draws = [draw_augmentation(seed=config.seed, image_id="bench", aug_index=a, height=h,
                                   width=w, n_crops=crops, crop_size=crop_size, color=color)
                 for a in range(augmentations)]
        payloads = [(color.apply(image, d.gain, d.shift), d.windows) for d in draws]
    else:
        payloads = [augmented_crops(image, seed=config.seed, image_id="bench", aug_index=a,
                                    n_crops=crops, crop_size=crop_size, color=color)
                    for a in range(augmentations)]

    def one_image() -> np.ndarray:
        # One batcher per image, as features.extract does: only an image's last batch is padded.
        if mode == "shared":
            batcher = MapBatcher(extractor)
            for augmented, windows in payloads:
                batcher.add(augmented, windows)
        else:
            batcher = ImageBatcher(extractor)
            for augmented_crops_ in payloads:
                batcher.add(augmented_crops_)
        return batcher.finish()

    # Trace and warm up on one batch of the timed shape, not a whole image (minutes on 2 cores).
    if mode == "shared":  # the graph MapBatcher runs: backbone and pooling
        extractor.pooled_maps(payloads[0][0][None], payloads[0][1][None])
    else:
        extractor.run_batch(payloads[0][:1])
    done, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or done == 0:
        features = one_image()
        if done == 0:
            np.save(features_out, features)
        done += crops * augmentations
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"backbone": backbone, "engine": engine, "mode": mode, "precision": precision,
            "device": extractor.device, "load_average_1min": os.getloadavg()[0],
            "weights": config.weights, "weights_sha256": config.weights_sha256,
            "seed": config.seed, "crop_side": int(payloads[0][1][0, 2]) if mode == "shared"
            else int(payloads[0].shape[1]), "crops_timed": done, "seconds_timed": elapsed,
            "crops_per_s": done / elapsed, "cpu_seconds_timed": cpu,
            # Work per CPU second (every thread of the process): less sensitive than crops/s
            # to other jobs taking the cores, though it counts the engines' spin-waiting too.
            "crops_per_cpu_s": done / cpu}


def peak_rss_mb() -> float:
    """Peak resident memory of this process's own address space, in MB.

    ``VmHWM`` rather than ``ru_maxrss``: on Linux a child's ``ru_maxrss`` starts at its
    parent's peak (carried over ``exec``), and the parent here holds TensorFlow and the FLOP
    counting models, so it would hide the worker's own figure.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args: list[str]) -> tuple[int, str, str]:
    """Run this script with ``args`` in a fresh process from the repository root.

    Returns ``(exit code, stdout, stderr)``; the last stdout line of a worker is its JSON.
    """
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True,
                          text=True)
    return proc.returncode, proc.stdout, proc.stderr


def measure_extraction(data: str, n_images: int, protocol: list[str]) -> dict:
    """A real ``pipeline.extract`` run on ``n_images`` images spread over ``data``, fresh store."""
    import pandas as pd

    from data.datasets import load_dataset

    frame = load_dataset(data)
    picks = frame.iloc[:: max(1, len(frame) // n_images)].head(n_images)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "subset.csv"
        pd.DataFrame({"path": picks.path, "label": picks.label}).to_csv(manifest, index=False)
        cmd = ["--data", str(manifest), "--out", str(Path(tmp) / "store"), "--quiet", *protocol]
        start = time.perf_counter()
        code, out, err = run_child(["--extract-worker", json.dumps(cmd)])
        seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"pipeline.extract failed on {len(picks)} images:\n{err[-2000:]}")
    return {"images": len(picks), "seconds": seconds, "seconds_per_image": seconds / len(picks),
            "peak_rss_mb": json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]}


def machine_description() -> dict:
    """What makes numbers differ between machines (and whether the CPU was busy)."""
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "tensorflow": tf.__version__, "python": platform.python_version()}


def projected_hours(row: dict, targets: Targets) -> float:
    """Hours of the paper protocol at this row's speed (backbone only, no decode or Macenko).

    Exact mode costs per crop; shared mode per augmented image, whatever its crop count.
    """
    augmented = targets.protocol_images * targets.protocol_augmentations
    crops = targets.protocol_crops if row["mode"] == "exact" else row["crops"]
    return augmented * crops / row["crops_per_s"] / 3600


def _row_cosines(a, b):
    import numpy as np

    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-30)


def cosine_stats(f32_file: Path, bf16_file: Path) -> dict | None:
    """Row-wise cosine between the float32 and bfloat16 features of the same crops.

    ``between_crops`` is the mean cosine between float32 features of *different* crops: the
    level below which a bfloat16 cosine says nothing (random-init networks map all crops to
    nearly one direction, so their cosines are all close to 1).
    """
    import numpy as np

    if not (f32_file.is_file() and bf16_file.is_file()):
        return None
    a, b = np.load(f32_file).astype(np.float64), np.load(bf16_file).astype(np.float64)
    if a.shape != b.shape:
        return None
    cos = _row_cosines(a, b)
    between = _row_cosines(a, np.roll(a, 1, axis=0)).mean() if len(a) > 1 else float("nan")
    return {"mean": float(cos.mean()), "min": float(cos.min()), "crops": len(cos),
            "between_crops": float(between)}


def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


def _weights_label(row: dict) -> str:
    return row["weights"] if row["weights"] != "none" else f"random(seed {row['seed']})"


def best_rows(rows: list[dict]) -> list[dict]:
    """One row per backbone, engine, mode and precision: the fastest of its repeats."""
    best = {}
    for r in rows:
        key = (r["backbone"], r.get("engine", "keras"), r["mode"], r["precision"])
        if "error" not in r and ("error" in best.get(key, {"error": 1})
                                 or r["crops_per_s"] > best[key]["crops_per_s"]):
            best[key] = r
        best.setdefault(key, r)
    return list(best.values())


def _cos_text(cos: dict | None) -> str:
    if not cos:
        return "cosine n/a"
    return (f"cosine mean {cos['mean']:.4f} min {cos['min']:.4f} "
            f"(other crops {cos['between_crops']:.3f})")


def summarize(rows: list[dict], cosine, targets: Targets) -> tuple[list[str], dict]:
    """The ratio lines of issues #6 and #16 and the same numbers as a dict (for ``--json``).

    ``cosine(a, b)`` gives :func:`cosine_stats` of the features of rows ``a`` and ``b`` (keys
    ``(backbone, engine, mode, precision)``: the same crops), or None.  A section whose pairs
    were not measured (one mode, one precision or one engine only) is left out.
    """
    find = {(r["backbone"], r.get("engine", "keras"), r["mode"], r["precision"]): r
            for r in rows if "error" not in r}
    sections = {"shared_over_exact": [], "bf16_over_f32": [], "f32_matmul_fraction": [],
                "engine_over_keras": []}
    text = {key: [] for key in sections}

    def same_weights(a, b):
        return (a["weights"], a["weights_sha256"]) == (b["weights"], b["weights_sha256"])

    for (backbone, engine, mode, precision), shared in find.items():
        exact = find.get((backbone, engine, "exact", precision))
        if mode != "shared" or exact is None:
            continue
        ratio = shared["crops_per_s"] / exact["crops_per_s"]
        target = targets.shared_speedup if backbone in targets.shared_backbones else None
        verdict = f"  target met: {_mark(ratio >= target)}" if target else ""
        text["shared_over_exact"].append(
            f"  {backbone:20s} {engine:8s} {precision:9s} {ratio:6.1f}x{verdict}")
        sections["shared_over_exact"].append(
            {"backbone": backbone, "engine": engine, "precision": precision, "ratio": ratio,
             "target": target})

    for (backbone, engine, mode, precision), bf16 in find.items():
        f32 = find.get((backbone, engine, mode, "float32"))
        if precision != "bfloat16" or f32 is None:
            continue
        ratio = bf16["crops_per_s"] / f32["crops_per_s"]
        cos = (cosine((backbone, engine, mode, precision), (backbone, engine, mode, "float32"))
               if same_weights(bf16, f32) else None)
        met = (cos is not None and ratio >= targets.bf16_speedup
               and cos["mean"] >= targets.bf16_cosine)
        # Random-init cosines are near 1 for any two crops: they cannot show the target is met.
        caveat = " (random weights: cosine inconclusive)" if f32["weights"] == "none" else ""
        text["bf16_over_f32"].append(f"  {backbone:20s} {engine:8s} {mode:7s} {ratio:5.2f}x  "
                                     f"{_cos_text(cos)}  target met: {_mark(met)}{caveat}")
        sections["bf16_over_f32"].append(
            {"backbone": backbone, "engine": engine, "mode": mode, "ratio": ratio, "cosine": cos,
             "weights": _weights_label(f32), "target_met": met})

    for (backbone, engine, mode, precision), r in find.items():
        if precision != "float32":
            continue
        target = targets.matmul_fraction if backbone in targets.matmul_backbones else None
        verdict = f"  target met: {_mark(r['matmul_fraction'] >= target)}" if target else ""
        text["f32_matmul_fraction"].append(
            f"  {backbone:20s} {engine:8s} {mode:7s} {100 * r['matmul_fraction']:5.1f}%{verdict}")
        sections["f32_matmul_fraction"].append(
            {"backbone": backbone, "engine": engine, "mode": mode,
             "fraction": r["matmul_fraction"], "target": target})

    for (backbone, engine, mode, precision), r in find.items():
        keras = find.get((backbone, "keras", mode, "float32"))
        if engine == "keras" or keras is None:
            continue
        ratio = r["crops_per_s"] / keras["crops_per_s"]
        cpu_ratio = r["crops_per_cpu_s"] / keras["crops_per_cpu_s"]
        cos = (cosine((backbone, engine, mode, precision), (backbone, "keras", mode, "float32"))
               if same_weights(r, keras) else None)
        target = (targets.engine_speedup if backbone in targets.engine_backbones
                  and mode == "shared" else None)
        verdict = f"  target met: {_mark(ratio >= target)}" if target else ""
        caveat = " (random weights: cosine inconclusive)" if keras["weights"] == "none" else ""
        text["engine_over_keras"].append(
            f"  {backbone:20s} {engine:8s} {mode:7s} {precision:9s} {ratio:5.2f}x "
            f"(per CPU second {cpu_ratio:5.2f}x)  {100 * r['matmul_fraction']:5.1f}% of matmul  "
            f"{_cos_text(cos)}{verdict}{caveat}")
        sections["engine_over_keras"].append(
            {"backbone": backbone, "engine": engine, "mode": mode, "precision": precision,
             "ratio": ratio, "cpu_ratio": cpu_ratio, "matmul_fraction": r["matmul_fraction"],
             "cosine": cos,
             "weights": _weights_label(keras), "target": target})

    headers = {
        "shared_over_exact": f"shared / exact crops/s (target >= {targets.shared_speedup:g}x "
                             f"for {', '.join(targets.shared_backbones)}):",
        "bf16_over_f32": f"bfloat16 / float32 crops/s, same engine (target >= "
                         f"{targets.bf16_speedup:g}x with mean feature cosine >= "
                         f"{targets.bf16_cosine:g}; same crops, same weights):",
        "f32_matmul_fraction": f"float32 achieved / matmul GFLOP/s (target >= "
                               f"{100 * targets.matmul_fraction:.0f}% for "
                               f"{', '.join(targets.matmul_backbones)}, both modes):",
        "engine_over_keras": f"engine / Keras float32 crops/s, same backbone and mode (target >= "
                             f"{targets.engine_speedup:g}x for "
                             f"{', '.join(targets.engine_backbones)} in shared mode); feature "
                             f"cosine against Keras float32 on the same crops:",
    }
    lines = [line for key in sections if text[key] for line in (headers[key], *text[key])]
    return lines, sections


def _worker(argv) -> None:
    kwargs = json.loads(argv[0])
    print(json.dumps({**measure_backbone(**kwargs), "peak_rss_mb": peak_rss_mb()}))


def _extract_worker(argv) -> None:
    """``pipeline.extract`` with ``argv`` in this process, so its peak memory is its own."""
    from pipeline.extract import main as extract_main

    code = extract_main(json.loads(argv[0]))
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
    sys.exit(code)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+",
                   default=["resnet50", "xception", "efficientnet_lite0"])
    p.add_argument("--modes", nargs="+", default=["exact", "shared"])
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--engines", nargs="+", default=["keras"], choices=["keras", "openvino"],
                   help="inference engines, run one after the other for each backbone, mode and "
                   "precision (interleaved: the load of a shared machine hits them alike)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each backbone/mode/precision's engines this many times, interleaved; "
                   "the ratios use each row's best run (the one least slowed by other jobs)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (random init where the file is missing) or 'none'")
    p.add_argument("--crop-size", type=int, default=750)
    p.add_argument("--crops", type=int, default=20, help="crops per augmented image")
    p.add_argument("--augmentations", type=int, default=8,
                   help="augmented copies per timed image (a multiple of --batch-size avoids "
                   "padded batches in shared mode)")
    p.add_argument("--image", type=int, nargs=2, default=[768, 1024], metavar=("H", "W"),
                   help="augmented image size (BACH scaled by 0.5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20,
                   help="minimum timing per configuration (at least one whole image)")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument("--data", help="a data set for the 1 / 10 / all images extraction runs")
    p.add_argument("--protocol", default="--augmentations 4 --crops 4",
                   help="extraction options for the --data runs")
    args = p.parse_args(argv)
    targets = Targets()
    image_hw = tuple(args.image)
    crop_side = min(args.crop_size, *image_hw)  # features.augment.effective_crop_size

    machine = machine_description()
    peak = matmul_gflops()  # once: the printed figure is the one the fractions use
    results = {"machine": machine, "matmul_gflops": peak, "targets": asdict(targets),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": []}

    def save() -> None:
        if args.json:
            from results import write_json

            write_json(args.json, results)

    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average "
          f"{machine['load_average_1min']:.1f} at start, TensorFlow {machine['tensorflow']}")
    print(f"dense float32 matmul (TensorFlow, 4096^2): {peak:.0f} GFLOP/s")
    print(f"input: synthetic H&E {image_hw[0]}x{image_hw[1]}, {args.augmentations} augmentations "
          f"x {args.crops} crops of {crop_side}, batch {args.batch_size}, >= {args.seconds:g} s "
          f"per row; projection: {targets.protocol_images} images x "
          f"{targets.protocol_augmentations} aug x {targets.protocol_crops} crops, backbone only")
    print(f"{'backbone':20s} {'engine':8s} {'mode':7s} {'precision':9s} {'weights':16s} "
          f"{'crops/s':>8s} {'GFLOP/s':>8s} {'%matmul':>7s} {'peak MB':>8s} {'paper h':>8s} "
          f"{'<=' + format(targets.protocol_hours, 'g') + 'h':>5s} {'load':>5s} "
          f"{'crops/CPU-s':>11s}", flush=True)
    flops = {b: backbone_flops(b, crop_side, image_hw) for b in args.backbones}

    def run_row(backbone: str, engine: str, mode: str, precision: str, features_out: Path) -> None:
        kwargs = dict(backbone=backbone, engine=engine, mode=mode, precision=precision,
                      weights=args.weights, crop_size=args.crop_size, crops=args.crops,
                      augmentations=args.augmentations, batch_size=args.batch_size,
                      image_hw=image_hw, seconds=args.seconds, features_out=str(features_out))
        label = f"{backbone:20s} {engine:8s} {mode:7s} {precision:9s}"
        code, out, err = run_child(["--worker", json.dumps(kwargs)])
        if code != 0:  # e.g. out of memory or no openvino: report it and go on with the others
            reason = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            results["rows"].append({"backbone": backbone, "engine": engine, "mode": mode,
                                    "precision": precision, "error": reason})
            print(f"{label} failed: {reason}", flush=True)
            save()
            return
        row = json.loads(out.strip().splitlines()[-1])
        # What really runs: the backbone on each crop, or once per augmented image.
        per_crop = (flops[backbone]["crop"] if mode == "exact"
                    else flops[backbone]["image"] / args.crops)
        row.update(crops=args.crops, gflop_per_crop=per_crop / 1e9,
                   achieved_gflops=row["crops_per_s"] * per_crop / 1e9)
        row["matmul_fraction"] = row["achieved_gflops"] / peak
        row["paper_protocol_hours"] = projected_hours(row, targets)
        row["paper_protocol_within_target"] = row["paper_protocol_hours"] <= targets.protocol_hours
        results["rows"].append(row)
        print(f"{label} {_weights_label(row):16s} {row['crops_per_s']:8.2f} "
              f"{row['achieved_gflops']:8.1f} {100 * row['matmul_fraction']:6.1f}% "
              f"{row['peak_rss_mb']:8.0f} {row['paper_protocol_hours']:8.2f} "
              f"{_mark(row['paper_protocol_within_target']):>5s} "
              f"{row['load_average_1min']:5.1f} {row['crops_per_cpu_s']:11.2f}", flush=True)
        save()

    with tempfile.TemporaryDirectory() as tmp:
        def features_file(key) -> Path:
            return Path(tmp) / ("-".join(key) + ".npy")

        for backbone in args.backbones:
            for mode in args.modes:
                for precision in args.precisions:
                    for _ in range(args.repeats):
                        for engine in args.engines:
                            run_row(backbone, engine, mode, precision,
                                    features_file((backbone, engine, mode, precision)))
        lines, results["ratios"] = summarize(
            best_rows(results["rows"]),
            lambda a, b: cosine_stats(features_file(a), features_file(b)), targets)
    print("\n".join(lines), flush=True)
    save()
    if args.data:
        results["extraction"] = []
        print(f"pipeline.extract {args.protocol} on {args.data}:")
        for n in (1, 10, 10**9):
            r = measure_extraction(args.data, n, args.protocol.split())
            results["extraction"].append(r)
            print(f"  {r['images']:4d} images: {r['seconds']:7.1f} s "
                  f"({r['seconds_per_image']:.2f} s/image), peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)
            save()
    if args.json:
        print(f"results written to {args.json}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the packages, also from a source tree that is not installed
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    elif len(sys.argv) > 2 and sys.argv[1] == "--extract-worker":
        _extract_worker(sys.argv[2:])
    else:
        main()
