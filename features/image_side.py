"""The image side of extraction: decode, scale, Macenko, then the augmentation items.

Decode, scale and Macenko of an image (:func:`prepare_image`) are independent of every other
image, so with ``workers > 1`` they run in that many worker processes, a bounded number of
images ahead (:func:`prepared_images`), while the extractor's producer thread turns each
prepared image into the per-augmentation items the backbone takes (:func:`image_items`: the
image once, then a colour table and crop windows per augmentation, which the backbone's graph
applies on the device).
Results come back in input order, and the work done per image is the same in every case, so the
store does not depend on the number of workers.  Worker processes come from a ``forkserver``
(``spawn`` where there is none): the parent has TensorFlow's threads running, which a plain
``fork`` would copy in a broken state, and a ``spawn`` child would import the parent's main
module (``pipeline.extract`` and the classifiers) again.  The fork server imports this module
once, and each worker is a fork of it.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from data.io import ImageReadError, read_image
from features.augment import (ColorAugmentation, HEDAugmentation, color_augmentation, draw_augmentation,
                              effective_crop_size)
from features.backbones import get_backbone
from features.config import ExtractionConfig
from features.pooling import grid_shape
from features.stain import StainNormalizer
from features.transforms import scale_image


def default_workers() -> int:
    """Image-preparing processes by default: one per core beyond the first (which feeds the
    backbone), at most 8; 1 (a thread, no process) on a 2-core machine, where the backbone
    already uses every core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


@dataclass(frozen=True)
class Preprocessing:
    """Per-run state of the image side: the fitted Macenko normaliser (or None) and the
    colour augmentation, both rebuilt from the config alone."""

    normalizer: StainNormalizer | None
    color: ColorAugmentation | HEDAugmentation
    min_input: int = 1  # the backbone's smallest input side

    @classmethod
    def from_config(cls, config: ExtractionConfig) -> "Preprocessing":
        normalizer = StainNormalizer.from_params(config.stain) if config.stain else None
        return cls(normalizer, color_augmentation(config), get_backbone(config.backbone).min_input)


def _too_small(image: np.ndarray, config: ExtractionConfig, min_input: int) -> str | None:
    """Why the backbone cannot take this (scaled) image, else None: skipped like an unreadable one."""
    h, w = image.shape[:2]
    side = min(h, w) if config.mode == "whole" else effective_crop_size(h, w, config.crop_size)
    if side < min_input:
        return (f"too small: {w}x{h} pixels at scale {config.scale} give a side of {side}, below "
                f"{config.backbone}'s minimum input {min_input}")
    if config.instances != "none":
        stride = get_backbone(config.backbone).stride
        rows, cols = grid_shape(config.instances, h, w)
        if h // stride < rows or w // stride < cols:
            return (f"too small: {w}x{h} pixels at scale {config.scale} give a feature map of about "
                    f"{w // stride}x{h // stride} cells, fewer than the {cols}x{rows} grid of instances "
                    f"{config.instances}")
    return None


def prepare_image(path, config: ExtractionConfig, prep: Preprocessing) -> tuple:
    """Decode, scale and stain-normalise one image file.

    Returns ``("image", image, stain_note)`` (``stain_note``: why Macenko was not applied, else
    None) or ``("error", reason)`` when the file cannot be read or is too small for the backbone.
    """
    try:
        image = scale_image(read_image(path), config.scale)
    except ImageReadError as exc:
        return ("error", exc.reason)
    if (reason := _too_small(image, config, prep.min_input)) is not None:
        return ("error", reason)
    note = None
    if prep.normalizer is not None:
        image, note = prep.normalizer.transform_or_keep(image)
    return ("image", image, note)


def prepared_images(rows, config: ExtractionConfig, prep: Preprocessing, workers: int = 1):
    """Yield ``(row, prepare_image(row.path, ...))`` in the order of ``rows``.

    ``workers <= 1`` prepares in the calling thread; more starts that many processes and keeps
    at most ``2 * workers`` images in flight, so memory stays bounded whatever the data set.
    Closing the generator (the consumer stopped) cancels the images not yet started.
    """
    if workers <= 1:
        for row in rows:
            yield row, prepare_image(row.path, config, prep)
        return
    pending: deque = deque()
    rows = iter(rows)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(),
                               initializer=_exit_with, initargs=(os.getpid(),))
    try:
        while True:
            while len(pending) < 2 * workers and (row := next(rows, None)) is not None:
                # The path only: a dataset row (a pandas namedtuple) does not pickle.
                pending.append((row, pool.submit(prepare_image, row.path, config, prep)))
            if not pending:
                return
            row, future = pending.popleft()
            yield row, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # at most the images in progress


def _exit_with(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Worker initializer: leave as soon as the extracting process is gone.

    After a ``kill -9`` nothing shuts the pool down, and a worker waiting for its next task
    would wait forever (it holds a write end of its own task queue, so it never reads an end
    of file); the fork server would stay with it.
    """
    def watch():
        while True:
            time.sleep(poll_seconds)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, owned by someone else
                pass

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _worker_context():
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # workers start with this module imported
    return context


def image_items(row, prepared: tuple, config: ExtractionConfig, prep: Preprocessing):
    """One image's work for the backbone: ``('image', image)``, then per augmentation
    ``('aug', i, (table, windows))`` and finally ``('end', note)``; or a single
    ``('error', reason)`` (``prepared`` is :func:`prepare_image`'s result).

    The image goes to the device once; each augmentation is its colour table
    (:meth:`AugmentationDraw.table`: 768 bytes for RGB, 48 for HED) and its crop windows ``(y, x, side)`` (``None``
    in whole mode), all drawn here from the seeded generator of (seed, image, augmentation).
    The extractor's graph applies the table and cuts or pools the windows.
    """
    if prepared[0] == "error":
        yield prepared
        return
    _, image, note = prepared
    yield ("image", image)
    for aug in range(config.augmentations):
        # Same colour draws in every mode; "whole" draws no crop windows.
        draw = draw_augmentation(
            seed=config.seed, image_id=row.image_id, aug_index=aug, height=image.shape[0],
            width=image.shape[1], n_crops=0 if config.mode == "whole" else config.crops,
            crop_size=config.crop_size, color=prep.color,
        )
        yield ("aug", aug, (draw.table(), None if config.mode == "whole" else draw.windows))
    yield ("end", note)


def iter_host_items(rows, config: ExtractionConfig, *, workers: int = 1,
                    prep: Preprocessing | None = None):
    """The whole image side, in order: per row ``('start', row)``, then its
    :func:`image_items`.  What the extractor's producer thread feeds the backbone with, and
    what ``benchmarks/feed_rate.py`` times with no backbone."""
    prep = prep or Preprocessing.from_config(config)
    with closing(prepared_images(rows, config, prep, workers)) as images:
        for row, prepared in images:
            yield ("start", row)
            yield from image_items(row, prepared, config, prep)
