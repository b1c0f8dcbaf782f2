"""The optional OpenVINO inference engine for the backbones (``engine="openvino"``).

The backbone's Keras model (the one registry entry, built as for the Keras engine) and its
input scaling are converted once to an OpenVINO model taking uint8 images, and run on the CPU
by OpenVINO, whose depthwise-convolution kernels and bfloat16 path (AVX512-BF16/AMX) are
faster than TensorFlow's for EfficientNet-Lite (``docs/benchmarks.md``).  The converted model
(IR: ``model.xml`` + ``model.bin``) is cached, keyed by backbone, weights sha256 (or the seed
of a random init), and the Keras, TensorFlow and OpenVINO versions, so a later run reads it
without importing TensorFlow or building the Keras model (``pipeline.predict`` on one image).

The colour tables, crops and pooling, which the Keras engine runs in its compiled graph, run
here on the host with the library's numpy functions (:meth:`ColorAugmentation.lut` tables or
:meth:`HEDAugmentation.apply_table`,
:func:`features.feature_maps.pool_windows`, :func:`features.pooling.pool_features`), equal to
the graph's.  Features differ from the Keras engine's beyond the last bit (other kernels; a
test states the tolerance), so the engine is part of the store key.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from data.files import atomic_directory, file_sha256, package_version
from features.augment import HEDAugmentation
from features.backbones import extractor_setup, get_backbone
from features.config import ExtractionConfig
from features.feature_maps import cell_means, window_cells
from features.pooling import pool_features

log = logging.getLogger(__name__)

INSTALL_HINT = ("the OpenVINO engine needs the openvino package: pip install openvino "
                "(or pip install -e \".[openvino]\" in a source checkout), or use engine 'keras'")

#: Converted models, one directory per key; override with this environment variable.
CACHE_ENV = "BHP_OPENVINO_CACHE"


class OpenVINOMissingError(ImportError, ValueError):
    """openvino is not installed; the message says how to install it.  Also a ValueError, so
    the command-line tools report it as a user error (one line, status 2)."""


def import_openvino():
    """``import openvino``, or :class:`OpenVINOMissingError` saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise OpenVINOMissingError(INSTALL_HINT) from exc
    return openvino


def default_cache_dir() -> Path:
    """``$BHP_OPENVINO_CACHE``, else ``~/.cache/breast-histology-pipeline/openvino``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "breast-histology-pipeline" / "openvino"


def model_key(config: ExtractionConfig) -> dict:
    """What identifies a converted backbone: the network and weights, the input it takes,
    and the versions of the libraries that built and converted it (read without importing)."""
    return {
        "backbone": config.backbone,
        "weights_sha256": config.weights_sha256,
        # Random init is reproducible from the seed (as the store key assumes).
        "random_init_seed": config.seed if config.weights_sha256 is None else None,
        "input": "uint8 (batch, height, width, 3), scaled by the backbone's preprocess",
        "feature_format": config.feature_format,
        "versions": {name: package_version(name)
                     for name in ("keras", "tensorflow", "openvino", "breast-histology-pipeline")},
    }


def _key_name(key: dict) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{key['backbone']}-{digest}"


def converted_model(config: ExtractionConfig, build_keras, cache_dir: Path | None = None):
    """The OpenVINO model of ``config``'s backbone: read from the cache, or converted from
    ``build_keras()`` (a float32 Keras model from preprocessed images to feature maps) and
    cached atomically (a killed conversion leaves no partial entry).

    Returns ``(openvino.Model, cached: bool)``.
    """
    ov = import_openvino()
    spec = get_backbone(config.backbone)
    key = model_key(config)
    directory = Path(cache_dir or default_cache_dir()) / _key_name(key)
    xml = directory / "model.xml"
    if xml.is_file():
        try:
            _check_entry(directory, key)
            return ov.Core().read_model(str(xml)), True
        except Exception as exc:  # a damaged or foreign entry is converted again, never trusted
            log.warning("converted model %s is unusable (%s); converting again", xml, exc)
    import tensorflow as tf

    model = build_keras()

    def maps(x):  # uint8 in, as the Keras engine's graph takes it
        return model(spec.preprocess(tf.cast(x, tf.float32)), training=False)

    signature = [tf.TensorSpec([None, None, None, 3], tf.uint8)]
    ov_model = ov.convert_model(tf.function(maps, input_signature=signature, autograph=False))
    try:
        with atomic_directory(directory) as tmp:
            # Full-precision weights: the precision is chosen when the model is compiled.
            ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
            files = {name: file_sha256(tmp / name) for name in ("model.xml", "model.bin")}
            (tmp / "key.json").write_text(json.dumps({**key, "files_sha256": files}, indent=1,
                                                     sort_keys=True))
        log.info("converted %s to OpenVINO, cached in %s", config.backbone, directory)
    except OSError as exc:  # a read-only cache costs the conversion next time, nothing else
        log.warning("cannot cache the converted model in %s: %s", directory, exc)
    return ov_model, False


def _check_entry(directory: Path, key: dict) -> None:
    """Raise ValueError unless ``directory`` holds the files its ``key.json`` names (sha256)
    for exactly ``key``: a truncated or edited file is never run."""
    record = json.loads((directory / "key.json").read_text())
    files = record.pop("files_sha256", {})
    if record != json.loads(json.dumps(key)):
        raise ValueError("its key.json describes another model")
    for name in ("model.xml", "model.bin"):
        if files.get(name) != file_sha256(directory / name):
            raise ValueError(f"{name} does not have the sha256 recorded in key.json")


class OpenVINOExtractor:
    """The :class:`features.extract.FeatureExtractor` interface on the OpenVINO engine.

    Parameters
    ----------
    config : the resolved extraction config (``engine="openvino"``).
    batch_size : crops (augmented images in shared/whole mode) per inference; the last batch
        of an image is zero-padded as with the Keras engine.
    cache_dir : where converted models are kept (default :func:`default_cache_dir`).
    build_keras : ``build_keras() -> keras.Model`` (float32) when the conversion is needed;
        default :func:`features.extract.build_backbone_model` of ``config``.
    """

    def __init__(self, config: ExtractionConfig, batch_size: int | None = None,
                 cache_dir: Path | str | None = None, build_keras=None):
        ov = import_openvino()
        self.batch_size, self.spec, weights_file = extractor_setup(config, batch_size)
        self.config = config
        if build_keras is None:
            def build_keras():
                from features.extract import build_backbone_model

                return build_backbone_model(config, self.spec, weights_file, "float32")
        model, self.cached = converted_model(config, build_keras, cache_dir)
        self.feature_dim = int(model.outputs[0].get_partial_shape()[-1].get_length())
        hint = "bf16" if config.precision == "bfloat16" else "f32"  # OpenVINO's CPU default is bf16
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "PERFORMANCE_HINT": "LATENCY"})
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: threads (a dask worker's) take turns
        self._boxes: dict = {}  # window size in cells -> compiled box filter (window_means)
        self.device = f"CPU (OpenVINO {ov.__version__}, {hint})"
        log.info("backbone %s runs on %s (engine openvino, model %s)", config.backbone, self.device,
                 "read from the cache" if self.cached else "converted now")

    def check_side(self, side: int) -> None:
        if side < self.spec.min_input:
            raise ValueError(
                f"crop side {side} is below {self.spec.name}'s minimum input {self.spec.min_input}")

    def _maps(self, images: np.ndarray, size: int) -> np.ndarray:
        """``(n, h, w, 3)`` uint8, zero-padded to ``size`` -> ``(n, h', w', dim)`` float32."""
        if np.asarray(images).dtype != np.uint8:
            raise TypeError(f"the extractor takes uint8 RGB images, got {np.asarray(images).dtype}")
        n = len(images)
        batch = np.zeros((size, *images.shape[1:]), dtype=np.uint8)
        batch[:n] = images
        # share_outputs=False: the result outlives the next inference.
        with self._lock:
            return self._request.infer({0: batch})[0][:n]

    def run_batch(self, crops: np.ndarray) -> np.ndarray:
        """Up to ``batch_size`` uint8 crops -> ``(n, feature_dim)``."""
        return self._maps(crops, self.batch_size).mean(axis=(1, 2), dtype=np.float64).astype(np.float32)

    def feature_maps(self, images: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """Up to ``batch_size`` same-shape uint8 images -> ``(n, h', w', dim)`` feature maps."""
        return np.array(self._maps(images, pad_to or self.batch_size), dtype=np.float32)

    def pooled_maps(self, images: np.ndarray, windows: np.ndarray | None, pooling: str = "mean",
                    pad_to: int | None = None) -> np.ndarray:
        """As :meth:`FeatureExtractor.pooled_maps`, pooled on the host (float64, as the graph)."""
        maps = self._maps(images, pad_to or self.batch_size)
        if windows is None:
            return maps.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
        means = self.window_means(maps[:len(images)], windows)
        return np.stack([pool_features(m, pooling) for m in means])

    def window_means(self, maps: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """:func:`features.feature_maps.pool_windows` of a batch: ``maps`` ``(b, h, w, C)``,
        ``windows`` ``(b, k, 3)`` of one side -> ``(b, k, C)`` float32 window means.

        An OpenVINO average pool of the window's size gives every window position's mean at
        once (float32 sums, within 1e-6 relative of the float64 summed-area table), then the
        windows' cells (:func:`window_cells`) pick theirs: 10x faster than the numpy table,
        which cost a third of Lite0's bfloat16 pass.
        """
        b, h, w, _ = maps.shape
        cells = np.array([[window_cells(y, x, side, self.spec.stride, h, w) for y, x, side in rows]
                          for rows in np.asarray(windows, dtype=np.int64)])  # (b, k, 4)
        r0, r1, c0, c1 = np.moveaxis(cells, -1, 0)
        size = (int(r1[0, 0] - r0[0, 0]), int(c1[0, 0] - c0[0, 0]))
        if not ((r1 - r0 == size[0]).all() and (c1 - c0 == size[1]).all()):
            raise ValueError("window_means takes windows of one side per batch")
        if size not in self._boxes:
            self._boxes[size] = self._box_filter(size)
        with self._lock:
            every = self._boxes[size].infer({0: np.ascontiguousarray(maps, dtype=np.float32)})[0]
        return every[np.arange(b)[:, None], r0, c0]

    @staticmethod
    def _box_filter(size: tuple[int, int]):
        """A compiled OpenVINO model: ``(b, h, w, C)`` -> mean of every ``size`` window."""
        ov = import_openvino()
        import openvino.opset13 as ops

        maps = ops.parameter([-1, -1, -1, -1], ov.Type.f32, name="maps")
        nchw = ops.transpose(maps, ops.constant(np.array([0, 3, 1, 2], np.int64)))
        means = ops.avg_pool(nchw, [1, 1], [0, 0], [0, 0], list(size), exclude_pad=True)
        out = ops.transpose(means, ops.constant(np.array([0, 2, 3, 1], np.int64)))
        model = ov.Model([out], [maps], "window_means")
        return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()

    def to_device(self, image: np.ndarray) -> np.ndarray:
        """The image stays on the host (the colour tables are applied there)."""
        if np.asarray(image).dtype != np.uint8:
            raise TypeError(f"the extractor takes uint8 RGB images, got {np.asarray(image).dtype}")
        return image

    def _colour(self, image: np.ndarray, table: np.ndarray) -> np.ndarray:
        # What the Keras graph computes: each channel through its table (rgb), or the OD
        # transform (hed; float32 as the graph, equal to it within a level on rounding edges).
        if self.config.color_augmentation == "hed":
            return HEDAugmentation.apply_table(image, table)
        out = np.empty_like(image)
        for c in range(3):
            out[..., c] = table[:, c][image[..., c]]
        return out

    def augmented_pooled(self, image, luts: np.ndarray, windows: np.ndarray | None,
                         pooling: str = "mean", pad_to: int | None = None,
                         instances: str = "none") -> np.ndarray:
        """:meth:`pooled_maps` of ``len(luts)`` colour augmentations of ``image``; with
        ``instances``, the map's cell means (:func:`features.feature_maps.cell_means`)."""
        copies = np.stack([self._colour(image, lut) for lut in luts])
        if instances != "none":
            return cell_means(self._maps(copies, pad_to or self.batch_size), instances)
        return self.pooled_maps(copies, windows, pooling, pad_to)

    def crop_features(self, image, luts: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """Exact mode: crop ``i`` cut at ``windows[i]`` ``(y, x, side)``, coloured by ``luts[i]``."""
        crops = np.stack([self._colour(image[y:y + s, x:x + s], lut)
                          for lut, (y, x, s) in zip(luts, np.asarray(windows))])
        return self.run_batch(crops)

    def features(self, crops: np.ndarray) -> np.ndarray:
        """``(n, side, side, 3)`` uint8 crops -> ``(n, feature_dim)`` float32, in batches."""
        return np.concatenate([self.run_batch(crops[i:i + self.batch_size])
                               for i in range(0, len(crops), self.batch_size)])
