"""Feature extraction: images -> stain normalisation -> colour augmentations -> crops -> CNN.

The image side (:mod:`features.image_side`: decode, scale, Macenko, in a background thread or
``workers`` processes) prepares the next images through a bounded queue while the main thread
runs the backbone, so peak memory holds a few images whatever their number.  Each prepared
image goes to the device once; the colour augmentation (a lookup table per augmentation,
drawn on the host from the seeded generator), the crops and the pooling run in the backbone's
compiled graph (:class:`PooledImage`), so only one vector per augmentation comes back.
Batches have a fixed shape and never mix images (the last batch of an image is zero-padded):
one compiled graph per image shape, and an image's features do not depend on which images
were run before it, so a resumed run equals an uninterrupted one bit for bit.
:func:`extract_one_image` runs the same steps for one image without the thread, for runs where
each image is a separate task (``features.distributed``).
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data.io import read_image  # noqa: F401  (tests reach it as features.extract.read_image)
from data.files import file_sha256
from features.augment import effective_crop_size
from features.backbones import extractor_setup, get_backbone, resolve_weights, weights_sha256
from features.config import ExtractionConfig
from features.openvino_engine import OpenVINOExtractor, import_openvino
from features.pooling import mean_of_instances, pool_features
from features.image_side import (Preprocessing, default_workers, image_items, iter_host_items,
                                 prepare_image)
from features.stain import check_stain_method, fit_stain_reference
from features.store import META_COLUMNS, FeatureStore, FeatureTable, make_record

log = logging.getLogger(__name__)


class _OneGraphPerExtractor(logging.Filter):
    """Drops TensorFlow's retracing warning: each :class:`FeatureExtractor` (one per store of a
    multi-store model) compiles its own graphs once, which TF counts as retracing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_OneGraphPerExtractor())

def make_config(
    dataset: pd.DataFrame | None = None,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str | None = "imagenet",
    stain_reference: str | None = "auto",
    stain_method: str = "macenko",
    **options,
) -> ExtractionConfig:
    """Resolve user options into a full :class:`ExtractionConfig`.

    Fails fast, before any image is processed: unknown backbone, missing weights file,
    unusable stain reference.  ``stain_reference`` is ``"auto"`` (chosen from ``dataset``),
    ``"none"`` (no normalisation) or an image path; ``stain_method`` estimates the stain
    vectors (:data:`features.stain.STAIN_METHODS`: ``"macenko"`` or ``"vahadane"``).  With ``mode="whole"`` the crop options
    (``crops``, ``crop_size``, ``pooling``) are ignored and recorded as 1, 0 and ``"mean"``.
    """
    spec = get_backbone(backbone)
    if options.get("mode") == "whole":
        # No crops: the crop options mean nothing, so they must not split the store key.
        options = {**options, "crops": 1, "crop_size": 0, "pooling": "mean"}
    ExtractionConfig(backbone=backbone, **options)  # bad values fail here, before any image is read
    if options.get("engine") == "openvino":
        import_openvino()  # not installed: say how, before any work
    weights_file = resolve_weights(spec, weights)
    scale = options.get("scale", ExtractionConfig.scale)
    check_stain_method(stain_method)
    if stain_reference is None or str(stain_reference).lower() == "none":
        if stain_method != "macenko":
            raise ValueError(f"stain_method {stain_method!r} asks for normalisation, but "
                             "stain_reference is 'none'")
        stain = None
    elif str(stain_reference).lower() == "auto":
        if dataset is None or len(dataset) == 0:
            raise ValueError("stain_reference='auto' needs the dataset to choose from")
        stain = fit_stain_reference(dataset, scale, method=stain_method)
    else:
        stain = fit_stain_reference(dataset, scale, reference=stain_reference, method=stain_method)
    return ExtractionConfig(
        backbone=backbone,
        weights="none" if weights_file is None else str(weights),
        weights_sha256=None if weights_file is None else weights_sha256(spec, weights_file),
        weights_file=None if weights_file is None else str(weights_file),
        stain=stain,
        **options,
    )


def backbone_options(backbone: str, *, weights: str = "imagenet", stain_reference: str | None = None,
                     crop_size: int | None = None, scale: float | None = None,
                     two_stage_model: str | Path | None = None):
    """Defaults of the options that depend on the backbone, as given on the command line.

    Returns ``(weights, stain_reference, crop_size, scale, model_stain)`` for
    :func:`make_config`; ``model_stain`` is the trained model's own Macenko state (to put in
    the config) or ``None``.  For a trained backbone (``two_stage``) the defaults are the
    model's (:attr:`BackboneSpec.extraction_defaults`); for the ImageNet backbones, the
    :class:`ExtractionConfig` defaults and the ``auto`` stain reference.
    """
    d = ExtractionConfig
    spec = get_backbone(backbone)
    if not spec.trained:
        if two_stage_model is not None:
            raise ValueError("`two_stage_model` is for `backbone` two_stage")
        if stain_reference is not None and stain_reference.lower() == "model":
            raise ValueError("`stain_reference` model is for `backbone` two_stage")
        # "is None", not "or": 0 is a value to reject (ExtractionConfig), not to replace
        return (weights, stain_reference or "auto", d.crop_size if crop_size is None else crop_size,
                d.scale if scale is None else scale, None)
    if two_stage_model is None:
        raise ValueError(f"`backbone` {backbone} needs `two_stage_model` (a trained two-stage model directory)")
    if weights != "imagenet":
        raise ValueError(f"`backbone` {backbone} takes its weights from `two_stage_model`, not `weights`")
    model = spec.extraction_defaults(Path(two_stage_model))
    scale = model["scale"] if scale is None else scale
    if scale != model["scale"]:
        log.warning("extracting at scale %s, but the two-stage model was trained at scale %s",
                    scale, model["scale"])
    stain, model_stain = stain_reference or "model", None
    if stain.lower() == "model":
        stain, model_stain = "none", model.get("stain")
    return (str(two_stage_model), stain, model["crop_size"] if crop_size is None else crop_size, scale,
            model_stain)


def resolve_config(dataset: pd.DataFrame | None = None, *, backbone: str = "efficientnet_lite0",
                   weights: str = "imagenet", stain_reference: str | None = None, crop_size: int | None = None,
                   scale: float | None = None, two_stage_model: str | Path | None = None,
                   **options) -> ExtractionConfig:
    """The :class:`ExtractionConfig` of options as a user gives them: :func:`backbone_options`'
    backbone-dependent defaults (``None``: the default), then :func:`make_config` with the other
    ``options`` (augmentations, crops, pooling, mode, precision, seed, batch_size)."""
    weights, stain_reference, crop_size, scale, model_stain = backbone_options(
        backbone, weights=weights, stain_reference=stain_reference, crop_size=crop_size, scale=scale,
        two_stage_model=two_stage_model)
    config = make_config(dataset, backbone=backbone, weights=weights, stain_reference=stain_reference,
                         crop_size=crop_size, scale=scale, **options)
    return config if model_stain is None else replace(config, stain=model_stain)


def extract_features(data, out, *, progress: bool = True, workers: int | None = None,
                     **options) -> "ExtractionSummary":
    """Images -> a cached feature store under ``out`` (what ``python -m pipeline.extract`` does).

    Parameters
    ----------
    data : path or pandas.DataFrame
        A folder of class folders, a CSV manifest (``data.load_dataset``), or its frame.
    out : path
        Store root; the store is ``out/<backbone>-<config hash>/``, resumable.
    progress : bool
        Show a progress bar.
    workers : int, optional
        Processes that decode and stain-normalise ahead of the backbone (default
        :func:`features.image_side.default_workers`); the store does not depend on it.
    **options
        As :func:`resolve_config` takes them: ``backbone``, ``weights``, ``stain_reference``,
        ``stain_method``, ``crop_size``, ``scale``, ``augmentations``, ``crops``, ``pooling``, ``mode``, ...

    Returns
    -------
    ExtractionSummary
        ``store_path``, images done now / already stored / skipped with their reasons.
    """
    from data.datasets import load_dataset

    dataset = data if isinstance(data, pd.DataFrame) else load_dataset(data)
    workers = default_workers() if workers is None else workers
    return extract_to_store(dataset, resolve_config(dataset, **options), out, progress=progress,
                            workers=workers)


def describe_device() -> str:
    """Which device TensorFlow will run the backbone on; logged so a GPU run is never silent."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"GPU ({', '.join(g.name for g in gpus)})"
    return "CPU (TensorFlow sees no GPU)"


_KERAS_SEEDS_LOCK = threading.Lock()


@contextmanager
def _private_keras_seeds(seed: int):
    """Give Keras a private ``random.Random(seed)`` for the seeds of unseeded initializers.

    Keras draws them from the process-wide ``random`` module, which other threads also draw
    from (a dask worker's event loop, for one): random-init weights built outside the main
    thread then depend on thread timing.  ``Random(seed)`` yields what ``random`` yields after
    ``keras.utils.set_random_seed(seed)``, so the weights are those of a quiet process.  Only
    random-init backbones are affected; loaded weights replace the initial ones anyway.
    """
    try:
        from keras.src.random import seed_generator
    except ImportError:  # another Keras layout: keep its behaviour
        seed_generator = None
    if seed_generator is None or not hasattr(seed_generator, "python_random"):
        yield
        return
    with _KERAS_SEEDS_LOCK:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared


def _check_uint8(images: np.ndarray) -> None:
    # Batches are uint8 on their way into the graph; a float array would be truncated silently.
    if np.asarray(images).dtype != np.uint8:
        raise TypeError(f"the extractor takes uint8 RGB images, got {np.asarray(images).dtype}")


def build_backbone_model(config: ExtractionConfig, spec, weights_file: Path | None, precision: str):
    """The Keras model of ``spec`` with ``weights_file`` (``None``: random init seeded by
    ``config.seed``, reproducible) under ``precision``'s dtype policy; a weights file that
    does not load is a ValueError naming it."""
    import keras

    keras.utils.set_random_seed(config.seed)  # random-init backbones are reproducible
    # Keras only offers a process-wide dtype policy: set it for the build, then restore.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        with _private_keras_seeds(config.seed):
            return spec.build(weights_file)
    except Exception as exc:  # torch_legacy / h5py / keras raise many types on a bad file
        if weights_file is None or isinstance(exc, MemoryError):
            raise
        raise ValueError(f"cannot load the {config.backbone} weights file {weights_file}: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        keras.config.set_dtype_policy(previous)


def make_extractor(config: ExtractionConfig, batch_size: int | None = None):
    """The extractor of ``config.engine``: :class:`FeatureExtractor` (Keras) or
    :class:`features.openvino_engine.OpenVINOExtractor`, one interface; a backbone without a
    network (:attr:`BackboneSpec.extractor`) brings its own."""
    spec = get_backbone(config.backbone)
    if spec.extractor is not None:
        return spec.extractor(config, batch_size)
    if config.engine == "openvino":
        return OpenVINOExtractor(config, batch_size=batch_size)
    return FeatureExtractor(config, batch_size=batch_size)


class FeatureExtractor:
    """Runs one backbone on crops in fixed-shape batches through one compiled graph per shape.

    Parameters
    ----------
    config : the resolved extraction config.
    batch_size : crops per forward pass; the last batch of an image is zero-padded.  Default:
        the config's, with which the store's features were computed (another size changes
        their last bits).
    """

    def __init__(self, config: ExtractionConfig, batch_size: int | None = None):
        import tensorflow as tf

        self.batch_size, self.spec, weights_file = extractor_setup(config, batch_size)
        self.config = config
        if config.engine != "keras":
            raise ValueError(f"FeatureExtractor runs engine 'keras', not {config.engine!r}: "
                             "use make_extractor(config)")
        self.model = build_backbone_model(config, self.spec, weights_file, config.precision)
        self.device = describe_device()
        # Where an image sent once per image lives (to_device); the graphs run there too.
        self._device = "/GPU:0" if self.device.startswith("GPU") else "/CPU:0"
        log.info("backbone %s runs on %s in %s (engine keras)", config.backbone, self.device,
                 config.precision)
        # One compiled graph per input shape; batches are padded to a fixed size to keep it so.
        # autograph=False: plain tensor code, nothing to convert (and no warning about lambdas).
        # Batches enter as uint8 and are scaled inside the graph: 4x less data to copy in, and
        # TF's kernels instead of numpy temporaries (~3 % of a ResNet50 pass at 750 px).  Lite
        # and ResNet50 features are bit-identical to scaling in numpy; Xception's differ in the
        # last bit (its division by 127.5).
        def maps(x):
            x = self.spec.preprocess(tf.cast(x, tf.float32))
            return tf.cast(self.model(x, training=False), tf.float32)

        self._maps = tf.function(maps, autograph=False)
        self._forward = tf.function(lambda x: tf.reduce_mean(maps(x), axis=[1, 2]), autograph=False)
        self._map_fn = maps
        self._pooled: dict = {}  # pooling method (None: whole map) -> compiled graph

    @property
    def feature_dim(self) -> int:
        return int(self.model.output_shape[-1])

    def check_side(self, side: int) -> None:
        if side < self.spec.min_input:
            raise ValueError(
                f"crop side {side} is below {self.spec.name}'s minimum input {self.spec.min_input}"
            )

    def run_batch(self, crops: np.ndarray) -> np.ndarray:
        """Up to ``batch_size`` uint8 crops -> ``(n, feature_dim)``, zero-padding the batch."""
        _check_uint8(crops)
        n, side = len(crops), crops.shape[1]
        batch = np.zeros((self.batch_size, side, side, 3), dtype=np.uint8)
        batch[:n] = crops
        return np.asarray(self._forward(batch))[:n].astype(np.float32)

    def feature_maps(self, images: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """Up to ``batch_size`` same-shape uint8 images -> ``(n, h', w', dim)`` feature maps.

        The batch is zero-padded to ``pad_to`` images (default ``batch_size``); keep it fixed
        within a run so that one graph serves every batch.
        """
        _check_uint8(images)
        n = len(images)
        batch = np.zeros((pad_to or self.batch_size, *images.shape[1:]), dtype=np.uint8)
        batch[:n] = images
        return np.asarray(self._maps(batch))[:n].astype(np.float32)

    def pooled_maps(self, images: np.ndarray, windows: np.ndarray | None, pooling: str = "mean",
                    pad_to: int | None = None) -> np.ndarray:
        """Shared and whole modes in one graph: up to ``batch_size`` same-shape uint8 augmented
        images -> ``(n, dim)``, one vector per image, pooled on the device.

        ``windows`` ``(n, k, 3)`` holds each image's crop windows ``(y, x, side)``: the map is
        averaged over each window (:func:`features.feature_maps.window_means_graph`), then the
        ``k`` window features are pooled with ``pooling``
        (:func:`features.pooling.pool_features_graph`).  ``windows=None`` averages the whole
        map.  Only the pooled vectors leave the device.  The batch is zero-padded to ``pad_to``
        images (default ``batch_size``).
        """
        _check_uint8(images)
        n, size = len(images), pad_to or self.batch_size
        batch = np.zeros((size, *images.shape[1:]), dtype=np.uint8)
        batch[:n] = images
        key = None if windows is None else pooling
        if key not in self._pooled:
            self._pooled[key] = self._pooled_graph(key)
        if windows is None:
            return np.asarray(self._pooled[key](batch))[:n]
        windows = np.asarray(windows, dtype=np.int32)
        padded = np.repeat(windows[:1], size, axis=0)  # any valid windows for the blank images
        padded[:n] = windows
        return np.asarray(self._pooled[key](batch, padded))[:n]

    def _colour_graph(self, images, tables, per_image: bool):
        """The config's colour augmentation in the graph: per-channel tables (rgb) or OD
        transforms (hed); ``features.augment``'s ``apply_graph``."""
        from features.augment import color_augmentation

        return color_augmentation(self.config).apply_graph(images, tables, per_image)

    def _pooled_graph(self, pooling: str | None, augment: bool = False):
        import tensorflow as tf

        from features.feature_maps import window_means_graph
        from features.pooling import pool_features_graph

        maps, stride = self._map_fn, self.spec.stride

        def whole(x):
            return tf.cast(tf.reduce_mean(tf.cast(maps(x), tf.float64), axis=[1, 2]), tf.float32)

        def windowed(x, windows):
            return pool_features_graph(window_means_graph(maps(x), windows, stride), pooling)

        if not augment:
            return tf.function(whole if pooling is None else windowed, autograph=False)
        colour = self._colour_graph
        if pooling is None:
            return tf.function(lambda image, luts: whole(colour(image, luts, False)),
                               autograph=False)
        return tf.function(lambda image, luts, windows: windowed(
            colour(image, luts, False), windows), autograph=False)

    def to_device(self, image: np.ndarray):
        """One uint8 image as a tensor on the backbone's device: sent once, whatever the number
        of its augmentations and crops (:meth:`augmented_pooled`, :meth:`crop_features`)."""
        import tensorflow as tf

        _check_uint8(image)
        with tf.device(self._device):
            return tf.identity(tf.convert_to_tensor(image))

    def augmented_pooled(self, image, luts: np.ndarray, windows: np.ndarray | None,
                         pooling: str = "mean", pad_to: int | None = None,
                         instances: str = "none") -> np.ndarray:
        """:meth:`pooled_maps` of ``len(luts)`` colour augmentations of one image made in the
        graph: ``image`` from :meth:`to_device`, ``luts`` ``(n, 256, 3)`` uint8 colour tables
        (:meth:`features.augment.ColorAugmentation.lut`; with ``color_augmentation="hed"``,
        ``(n, 4, 3)`` float32 OD transforms, :meth:`features.augment.HEDAugmentation.table`),
        ``windows`` ``(n, k, 3)`` or None.  With tables, equal bit for bit to :meth:`pooled_maps`
        of the copies augmented on the host.
        ``instances="cells-AxB"`` (with ``windows=None``) returns ``(n, A * B, dim)``: the map
        averaged over each cell (:func:`features.feature_maps.cell_means_graph`)."""
        n, size = len(luts), pad_to or self.batch_size
        tables = _padded_tables(luts, size)
        if instances != "none":
            if windows is not None:
                raise ValueError("instances are the cells of the whole image's map: pass windows=None")
            key = ("cells", instances)
            if key not in self._pooled:
                self._pooled[key] = self._cells_graph(instances)
            return np.asarray(self._pooled[key](image, tables))[:n]
        key = ("augmented", None if windows is None else pooling)
        if key not in self._pooled:
            self._pooled[key] = self._pooled_graph(key[1], augment=True)
        if windows is None:
            return np.asarray(self._pooled[key](image, tables))[:n]
        windows = np.asarray(windows, dtype=np.int32)
        padded = np.repeat(windows[:1], size, axis=0)
        padded[:n] = windows
        return np.asarray(self._pooled[key](image, tables, padded))[:n]

    def crop_features(self, image, luts: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """Exact mode in the graph: up to ``batch_size`` crops of one image, crop ``i`` cut at
        ``windows[i]`` ``(y, x, side)`` and coloured by ``luts[i]`` -> ``(n, feature_dim)``.
        Equal bit for bit to :meth:`run_batch` of the same crops made on the host
        (:func:`features.augment.augmented_crops`); the batch is padded with blank crops."""
        n, size = len(luts), self.batch_size
        side = int(windows[0, 2])
        tables = _padded_tables(luts, size)
        positions = np.zeros((size, 2), np.int32)
        positions[:n] = np.asarray(windows)[:, :2]
        key = ("crops", side)
        if key not in self._pooled:
            self._pooled[key] = self._crops_graph(side)
        return np.asarray(self._pooled[key](image, tables, positions))[:n]

    def _cells_graph(self, instances: str):
        import tensorflow as tf

        from features.feature_maps import cell_means_graph

        maps, colour = self._map_fn, self._colour_graph
        return tf.function(lambda image, luts: cell_means_graph(maps(colour(image, luts, False)),
                                                                instances), autograph=False)

    def _crops_graph(self, side: int):
        import tensorflow as tf

        from features.augment import crops_graph

        maps, colour = self._map_fn, self._colour_graph

        def forward(image, luts, positions):
            crops = colour(crops_graph(image, positions, side), luts, per_image=True)
            return tf.reduce_mean(maps(crops), axis=[1, 2])
        return tf.function(forward, autograph=False)

    def features(self, crops: np.ndarray) -> np.ndarray:
        """``(n, side, side, 3)`` uint8 crops of one image -> ``(n, feature_dim)`` float32."""
        batcher = ImageBatcher(self)
        batcher.add(crops)
        return batcher.finish()


def _padded_tables(tables: np.ndarray, size: int) -> np.ndarray:
    """``tables`` (one colour table per augmentation, any shape and dtype) zero-padded to
    ``size``: all-zero tables make blank padding images (black for rgb, white for hed)."""
    tables = np.asarray(tables)
    padded = np.zeros((size, *tables.shape[1:]), tables.dtype)
    padded[:len(tables)] = tables
    return padded


class ImageBatcher:
    """Collects one image's crops across augmentations into full batches; pads only the last."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor, self.pending, self.done = extractor, [], []

    def add(self, crops: np.ndarray) -> None:
        self.extractor.check_side(crops.shape[1])
        self.pending.extend(crops)
        size = self.extractor.batch_size
        while len(self.pending) >= size:
            self.done.append(self.extractor.run_batch(np.stack(self.pending[:size])))
            del self.pending[:size]

    def finish(self) -> np.ndarray:
        if self.pending:
            self.done.append(self.extractor.run_batch(np.stack(self.pending)))
            self.pending = []
        return np.concatenate(self.done)


class MapBatcher:
    """Shared and whole modes: batches one image's augmented copies through
    :meth:`FeatureExtractor.pooled_maps`, which pools each crop window of their feature maps and
    then the windows of each copy (``windows=None``: the whole map) on the device.

    Parameters
    ----------
    extractor : FeatureExtractor
    per_image : augmented copies per image, when fewer than the extractor's batch size: batches
        are padded to this many images instead (padding to the batch size would run the
        backbone on blank images, e.g. 4 of 8 with 4 augmentations).
    pooling : how the windows of one augmented copy are pooled (``features.pooling``).
    """

    def __init__(self, extractor: FeatureExtractor, per_image: int | None = None,
                 pooling: str = "mean"):
        self.extractor, self.pending, self.done = extractor, [], []
        self.size = min(extractor.batch_size, per_image or extractor.batch_size)
        self.pooling = pooling

    def add(self, image: np.ndarray, windows: np.ndarray | None) -> None:
        side = min(image.shape[:2]) if windows is None else int(windows[0, 2])
        self.extractor.check_side(side)
        self.pending.append((image, windows))
        if len(self.pending) == self.size:
            self._run()

    def _run(self) -> None:
        images = np.stack([img for img, _ in self.pending])
        windows = None if self.pending[0][1] is None else np.stack([w for _, w in self.pending])
        self.done.append(self.extractor.pooled_maps(images, windows, self.pooling, self.size))
        self.pending = []

    def finish(self) -> np.ndarray:
        """``(augmented copies, dim)``: one pooled vector per copy added."""
        if self.pending:
            self._run()
        return np.concatenate(self.done)


@dataclass
class ExtractionSummary:
    """What a run did: images done now, already done before, skipped (with reasons)."""

    store_path: Path | None = None
    done: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    unnormalized: list[dict] = field(default_factory=list)
    crops: int = 0
    seconds: float = 0.0
    device: str = ""

    @property
    def crops_per_second(self) -> float:
        return self.crops / self.seconds if self.seconds > 0 else 0.0


_END = object()


class PooledImage:
    """Consumer side of one image: sends it to the device once (:meth:`set_image`), then
    batches its augmentations' colour tables and crop windows (:meth:`add`) through the
    extractor's graph, which augments, crops or pools on the device; :meth:`finish` gives one
    vector per augmentation.  Batches never mix images; only an image's last one is padded.

    Parameters
    ----------
    config : the extraction config (mode, pooling, augmentations).
    extractor : a :class:`FeatureExtractor` for it.
    """

    def __init__(self, config: ExtractionConfig, extractor: FeatureExtractor):
        self.config, self.extractor = config, extractor
        self.image, self.pending, self.done = None, [], []
        # Exact mode: batches of crops, across augmentations.  Shared/whole: augmented copies,
        # padded to the augmentations when fewer than a batch (no backbone pass on blanks).
        self.size = (extractor.batch_size if config.mode == "exact"
                     else min(extractor.batch_size, config.augmentations))

    def set_image(self, image: np.ndarray) -> None:
        """The prepared (scaled, normalised) uint8 image; sent to the device here."""
        h, w = image.shape[:2]
        whole = self.config.mode == "whole"
        self.extractor.check_side(min(h, w) if whole else effective_crop_size(h, w, self.config.crop_size))
        self.image = self.extractor.to_device(image)

    def add(self, payload) -> int:
        """One augmentation ``(lut, windows)`` (``features.image_side.image_items``); returns
        the crops it holds (augmented images in whole mode)."""
        lut, windows = payload
        if self.config.mode == "exact":
            self.pending.extend((lut, w) for w in windows)
        else:
            self.pending.append((lut, windows))
        while len(self.pending) >= self.size:
            self._run(self.pending[:self.size])
            del self.pending[:self.size]
        return self.config.crops

    def _run(self, items) -> None:
        luts = np.stack([lut for lut, _ in items])
        if self.config.mode == "exact":
            self.done.append(self.extractor.crop_features(self.image, luts,
                                                            np.stack([w for _, w in items])))
            return
        windows = None if self.config.mode == "whole" else np.stack([w for _, w in items])
        self.done.append(self.extractor.augmented_pooled(self.image, luts, windows,
                                                         self.config.pooling, self.size,
                                                         instances=self.config.instances))

    def finish(self) -> np.ndarray:
        """``(augmentations, feature_dim)`` float32; with ``config.instances``,
        ``(augmentations, instances, feature_dim)`` (:func:`features.store.make_record` keeps
        them and their mean)."""
        if self.pending:
            self._run(self.pending)
            self.pending = []
        features = np.concatenate(self.done)
        if self.config.mode != "exact":  # pooled on the device already
            return features
        crop_features = features.reshape(self.config.augmentations, self.config.crops, -1)
        return np.stack([pool_features(f, self.config.pooling) for f in crop_features])


def _producer(rows, config, out: queue.Queue, stop: threading.Event, workers: int):
    try:
        with closing(iter_host_items(rows, config, workers=workers)) as items:
            for item in items:
                if stop.is_set():
                    break
                out.put(item)
    except BaseException as exc:  # surface unexpected failures in the main thread
        out.put(("fatal", exc))
    finally:
        out.put(_END)


def iter_image_features(rows, config: ExtractionConfig, extractor,
                        summary: ExtractionSummary, prefetch: int = 4, workers: int = 1):
    """Yield ``(row, features (n_aug, dim), stain_note)`` per readable image, in order.

    Unreadable images are appended to ``summary.skipped`` and not yielded.  ``workers``
    processes decode and normalise the next images (:mod:`features.image_side`; 1: this
    function's producer thread does it); the features do not depend on it.  ``extractor`` is a
    :class:`FeatureExtractor` or a callable returning one: it is then called once the image
    side has started, so the first image is decoded and stain-normalised while the backbone
    builds (a prediction's latency).
    """
    items: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    thread = threading.Thread(target=_producer, args=(rows, config, items, stop, workers),
                              daemon=True)
    thread.start()
    row, pooled = None, None
    try:
        if not hasattr(extractor, "augmented_pooled"):  # a builder, not an extractor
            extractor = extractor()
        while (item := items.get()) is not _END:
            kind = item[0]
            if kind == "start":
                row, pooled = item[1], PooledImage(config, extractor)
            elif kind == "image":
                pooled.set_image(item[1])
            elif kind == "aug":
                summary.crops += pooled.add(item[2])
            elif kind == "end":
                yield row, pooled.finish(), item[1]
            elif kind == "error":
                summary.skipped.append({"image_id": row.image_id, "path": row.path, "reason": item[1]})
                log.warning("skipped %s: %s", row.path, item[1])
            elif kind == "fatal":
                raise item[1]
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass


@dataclass
class ImageFeatures:
    """One image's result from :func:`extract_one_image`.

    Attributes
    ----------
    features : ``(augmentations, feature_dim)`` float32, or ``None`` when the image was skipped.
    stain_note : why Macenko was not applied (the image is then kept unnormalised), else ``None``.
    skip_reason : why the image could not be read, else ``None``.
    crops : crops run through the backbone.
    """

    features: np.ndarray | None
    stain_note: str | None = None
    skip_reason: str | None = None
    crops: int = 0


def extract_one_image(row, config: ExtractionConfig, extractor: FeatureExtractor,
                      prep: Preprocessing | None = None) -> ImageFeatures:
    """Extract one image synchronously, with exactly the computation of
    :func:`iter_image_features` (same items, batches and pooling), so its features are equal
    bit for bit; used where images are independent tasks (``features.distributed``).

    Parameters
    ----------
    row : anything with ``image_id`` and ``path`` attributes (a dataset row).
    config : the resolved extraction config.
    extractor : a :class:`FeatureExtractor` for ``config``.
    prep : :meth:`Preprocessing.from_config` of ``config``, built here when omitted.
    """
    prep = prep or Preprocessing.from_config(config)
    pooled, crops = PooledImage(config, extractor), 0
    for item in image_items(row, prepare_image(row.path, config, prep), config, prep):
        if item[0] == "error":
            return ImageFeatures(None, skip_reason=item[1])
        if item[0] == "image":
            pooled.set_image(item[1])
        elif item[0] == "aug":
            crops += pooled.add(item[2])
        else:
            return ImageFeatures(pooled.finish(), stain_note=item[1], crops=crops)
    raise AssertionError("unreachable: _image_items always ends with 'end' or 'error'")


def plan_extraction(dataset: pd.DataFrame, store: FeatureStore,
                    summary: ExtractionSummary) -> tuple[list, dict]:
    """Split ``dataset`` into images still to extract and images already in ``store``.

    Finished images get their label/group/path refreshed and go to ``summary.cached``; files
    that cannot be hashed go to ``summary.skipped``.  Returns ``(todo rows, {image_id:
    source sha256})``.
    """
    todo, hashes = [], {}
    for row in dataset.itertuples(index=False):
        try:
            hashes[row.image_id] = file_sha256(row.path)
        except OSError as exc:
            summary.skipped.append({"image_id": row.image_id, "path": row.path, "reason": str(exc)})
            continue
        if store.is_done(row.image_id, hashes[row.image_id]):
            store.update_meta(row.image_id, row.label, row.group, row.path, _magnification(row))
            summary.cached.append(row.image_id)
        else:
            todo.append(row)
    log.info("%d images to extract, %d already in %s", len(todo), len(summary.cached), store.path)
    return todo, hashes


def _magnification(row) -> str:
    return str(getattr(row, "magnification", "") or "")


def write_image_record(store: FeatureStore, row, source_sha256: str, features: np.ndarray,
                       stain_note: str | None) -> None:
    """Atomically store one finished image (``row`` has ``image_id, label, group, path`` and
    optionally ``magnification``)."""
    store.write(make_record(
        image_id=row.image_id, label=row.label, group=row.group, path=row.path,
        source_sha256=source_sha256, features=features, stain_note=stain_note,
        magnification=_magnification(row),
    ))


def extract_to_store(
    dataset: pd.DataFrame,
    config: ExtractionConfig,
    store_root: Path | str,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    workers: int = 1,
) -> ExtractionSummary:
    """Extract every image of ``dataset`` not yet in the store; resumable and atomic per image.

    ``dataset`` has columns ``image_id, path, label, group`` and optionally ``magnification``
    (``data.datasets.load_dataset``); labels are any class names.
    ``batch_size`` is ``config.batch_size`` (part of the store key); another value is an error.
    ``workers`` processes decode and stain-normalise the next images while the backbone runs
    (:func:`features.image_side.default_workers` is a good value); the store does not depend
    on it.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    check_batch_size(config, batch_size)
    with FeatureStore(store_root, config).open() as store:
        summary = ExtractionSummary(store_path=store.path)
        store.write_dataset(dataset["image_id"])
        todo, hashes = plan_extraction(dataset, store, summary)
        if todo:
            extractor = make_extractor(config, batch_size=batch_size)
            summary.device = extractor.device
            start = time.perf_counter()
            bar = tqdm(total=len(todo), unit="img", disable=not progress, desc=config.backbone)
            log.info("image side: %s", "1 thread" if workers == 1 else f"{workers} worker processes")
            for row, feats, note in iter_image_features(todo, config, extractor, summary,
                                                        workers=workers):
                write_image_record(store, row, hashes[row.image_id], feats, note)
                summary.done.append(row.image_id)
                if note:
                    summary.unnormalized.append({"image_id": row.image_id, "reason": note})
                summary.seconds = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(crops_per_s=f"{summary.crops_per_second:.1f}")
            bar.close()
            summary.seconds = time.perf_counter() - start
        store.write_skipped(summary.skipped)
    return summary


def check_batch_size(config: ExtractionConfig, batch_size: int | None) -> None:
    """A batch size given next to a config must be the config's (it changes the features)."""
    if batch_size is not None and batch_size != config.batch_size:
        raise ValueError(f"batch_size {batch_size} differs from the config's {config.batch_size}; the batch "
                         "size changes the last bits of the features, so it is part of the config: "
                         "make_config(..., batch_size=N)")


def extract_in_memory(
    dataset: pd.DataFrame, config: ExtractionConfig, *, batch_size: int | None = None,
    progress: bool = False,
) -> tuple[FeatureTable, ExtractionSummary]:
    """Extract features without a store (prediction on new images), with ``config.batch_size``
    unless ``batch_size`` is given."""
    summary = ExtractionSummary()
    built = []

    def build():  # called once the image side runs: the two overlap
        built.append(make_extractor(config, batch_size=batch_size))
        summary.device = built[0].device
        return built[0]

    rows, blocks, bags = [], [], []
    start = time.perf_counter()
    rows_in = list(dataset.itertuples(index=False))
    for row, feats, note in tqdm(iter_image_features(rows_in, config, build, summary),
                                 total=len(rows_in), disable=not progress, unit="img"):
        for aug in range(len(feats)):
            rows.append((row.image_id, row.label, row.group, aug, row.path, note, _magnification(row), ""))
        if feats.ndim == 3:  # an instance config: the vector is their mean, as in a store's record
            bags.append(feats)
            feats = mean_of_instances(feats)
        blocks.append(feats)
        if note:
            summary.unnormalized.append({"image_id": row.image_id, "reason": note})
    summary.seconds = time.perf_counter() - start
    meta = pd.DataFrame(rows, columns=list(META_COLUMNS))
    X = np.concatenate(blocks) if blocks else np.zeros((0, built[0].feature_dim), np.float32)
    record = {**config.to_dict(), "config_hash": config.config_hash}
    instances = np.concatenate(bags) if bags else None
    return FeatureTable(meta=meta, X=X, config=record, instances=instances), summary
