"""Cost of fine-tuning a pretrained patch-wise network on this device, against the paper's network.

Times training steps (``train_on_batch``, the call :func:`classifiers.two_stage.training.train_stage`
makes) and inference batches of the two-stage CNN's patch-wise network built by
:func:`classifiers.two_stage.model.build_patch_network` from a :func:`classifiers.two_stage.cv.preset_config`
preset: ``finetune`` (ImageNet EfficientNet-Lite0, 384-pixel patches of images at half resolution, batches of 16) and the
paper's from-scratch network (``nazeri``) on the same patches and batch size.  The first step
(graph tracing) is not timed.  Then it projects the hours of one cross-validation fold of the
``finetune`` preset on bach-dev (``--images`` images of ``--image-size`` in ``--folds`` folds: the
training images minus the validation share, the preset's scale, stride and copies, its epochs)
for each network: patch-wise training steps, plus the patch-wise forward passes the fold also
makes (validation after every epoch, the image-wise network's inputs, the 8 views of the test
images); the image-wise network (a few seconds) is left out.  It also times the host's
stream of augmented training patches, which bounds an epoch on a fast GPU.

Usage (from the repository root)::

    nice -n 10 python benchmarks/finetune_cost.py [--steps 3] [--networks efficientnet_lite0 nazeri] \\
        [--config '{"scale": 0.125, "patch_size": 128, "stride": 64}'] [--json runs/finetune_cost.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fold_workload(cfg, images: int, folds: int, image_hw=(1536, 1536)) -> dict:
    """Patches the patch-wise network trains on and runs forward in one fold of ``cfg``."""
    from classifiers.two_stage.grid import grid_shape

    h, w = (max(1, round(s * cfg.scale)) for s in image_hw)
    train_images = images - math.ceil(images / folds)
    fit_images = round(train_images * (1 - cfg.val_fraction))
    val_images, test_images = train_images - fit_images, math.ceil(images / folds)
    train_patches = math.prod(grid_shape(h, w, cfg.patch_size, cfg.stride))
    grid_patches = math.prod(grid_shape(h, w, cfg.patch_size, cfg.patch_size))
    steps = math.ceil(fit_images * train_patches * cfg.patch_copies / cfg.batch_size) * cfg.epochs
    forward = (val_images * grid_patches * cfg.epochs  # validation after every epoch
               + fit_images * cfg.image_copies * grid_patches + val_images * grid_patches  # image-wise inputs
               + test_images * 8 * grid_patches)  # the 8 views of every test image
    return {"image_hw": [h, w], "fit_images": fit_images, "val_images": val_images, "test_images": test_images,
            "train_patches_per_image": train_patches, "train_steps": steps, "forward_patches": forward}


def host_patch_rate(cfg, image_hw, images: int = 4) -> dict:
    """Training patches per second the host streams (:func:`classifiers.two_stage.training.patch_batches`:
    crops, rotations/flips, colour jitter) from decoded synthetic images of the scaled size: on a
    GPU this, not the network, may bound an epoch."""
    import numpy as np

    from classifiers.two_stage import training
    from data.synthetic import make_image

    rng = np.random.default_rng(0)
    pixels = [make_image(label, rng, tuple(image_hw)) for label in ("normal", "benign", "insitu", "invasive")[:images]]
    cache = training.ImageCache([str(i) for i in range(len(pixels))], lambda p: pixels[int(p)], 1e9)
    tic, n = time.perf_counter(), 0
    for x, _ in training.patch_batches(cache, np.arange(len(pixels)), np.arange(len(pixels)), patch_size=cfg.patch_size,
                                       stride=cfg.stride, copies=cfg.patch_copies, jitter=cfg.color_jitter,
                                       batch_size=cfg.batch_size, block=cfg.shuffle_block, rng=rng):
        n += len(x)
    return {"patches": n, "patches_per_s": n / (time.perf_counter() - tic)}


def time_network(cfg, steps: int, n_classes: int = 4) -> dict:
    """Seconds per training step and per inference batch of ``cfg.batch_size`` patches."""
    import keras
    import numpy as np

    from classifiers.two_stage.model import build_patch_network, infer

    keras.utils.set_random_seed(cfg.seed)
    tic = time.perf_counter()
    net = build_patch_network(cfg, n_classes)
    build_s = time.perf_counter() - tic
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (cfg.batch_size, cfg.patch_size, cfg.patch_size, 3)).astype(np.float32)
    y = rng.integers(0, n_classes, cfg.batch_size)
    tic = time.perf_counter()
    net.train_on_batch(x, y)
    first_s = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(steps):
        net.train_on_batch(x, y)
    step_s = (time.perf_counter() - tic) / steps
    infer(net, x)
    tic = time.perf_counter()
    for _ in range(steps):
        infer(net, x)
    forward_s = (time.perf_counter() - tic) / steps
    return {"params": int(net.count_params()), "trainable_params": int(sum(int(np.prod(v.shape))
                                                                          for v in net.trainable_weights)),
            "build_s": build_s, "first_step_s": first_s, "step_s": step_s, "forward_batch_s": forward_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=["efficientnet_lite0", "nazeri"],
                   help="patch_network values to time on the finetune preset's patches")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (and inference batches) per network")
    p.add_argument("--weights", default="imagenet", help="patch_weights of the pretrained networks (time does "
                   "not depend on them)")
    p.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                   help="TwoStageConfig fields over the finetune preset, e.g. '{\"scale\": 0.125, "
                   "\"patch_size\": 128, \"stride\": 64}'")
    p.add_argument("--images", type=int, default=300, help="images of the data set (bach-dev: 300)")
    p.add_argument("--image-size", type=int, nargs=2, default=(1536, 1536), metavar=("H", "W"),
                   help="their size before scaling (bach-dev: 1536 x 1536; BACH as distributed: 1536 2048)")
    p.add_argument("--folds", type=int, default=6)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    from classifiers.two_stage.cv import preset_config
    from features.extract import describe_device

    base = preset_config("finetune", args.config, scheme="bach4", seed=0)
    work = fold_workload(base, args.images, args.folds, tuple(args.image_size))
    device = describe_device()
    print(f"device: {device}")
    h, w = work["image_hw"]
    given = f" with {json.dumps(args.config)}" if args.config else ""
    print(f"finetune preset{given}: {base.patch_size}-px patches of {w}x{h} images (scale {base.scale}), "
          f"batch {base.batch_size}, {base.epochs} epochs x {base.patch_copies} copies; a fold of {args.images} "
          f"images / {args.folds}: {work['fit_images']} training + {work['val_images']} validation images x "
          f"{work['train_patches_per_image']} patches -> {work['train_steps']} training steps, "
          f"{work['forward_patches']} patches forward")
    host = host_patch_rate(base, work["image_hw"])
    steps_s = work["train_steps"] * base.batch_size / host["patches_per_s"]
    print(f"host patch stream: {host['patches_per_s']:.0f} patches/s ({host['patches']} patches) -> at least "
          f"{steps_s / 3600:.2f} h per fold for the training patches whatever the device")
    rows = []
    for network in args.networks:
        cfg = base if network == base.patch_network else replace(
            base, patch_network=network, patch_weights=args.weights if network != "nazeri" else base.patch_weights,
            **({"channels": 1, "patch_head": "flatten"} if network == "nazeri" else {}))
        timing = time_network(cfg, args.steps)
        hours = (work["train_steps"] * timing["step_s"]
                 + work["forward_patches"] / cfg.batch_size * timing["forward_batch_s"]) / 3600
        rows.append({"network": network, **timing, "fold_hours": hours, "cv_hours": hours * args.folds})
        print(f"{network:>20}: {timing['params']:,} parameters ({timing['trainable_params']:,} trainable), "
              f"{timing['step_s']:.2f} s per training step of {cfg.batch_size} (first step {timing['first_step_s']:.1f} s), "
              f"{timing['forward_batch_s']:.2f} s per inference batch -> {hours:.1f} h per fold, "
              f"{hours * args.folds:.1f} h for {args.folds} folds")
    if len(rows) > 1:
        ref = rows[-1]
        for row in rows[:-1]:
            print(f"{row['network']} / {ref['network']}: {row['step_s'] / ref['step_s']:.2f}x per training step")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "workload": work, "steps": args.steps, "host": host,
                                         "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
