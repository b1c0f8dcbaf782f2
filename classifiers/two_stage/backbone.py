"""The ``two_stage`` backbone: a trained two-stage model's patch-wise network as feature extractor.

Registered with :mod:`features.backbones` from here, the side that owns the model directory's
files, when :mod:`classifiers` is imported.  Its "weights" are a two-stage model directory
(``python -m pipeline.two_stage train``, or a fold model of ``pipeline.cv_report``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from classifiers.model_files import load_network
from features.backbones import BackboneSpec, WeightsNotFoundError, register_backbone

#: Files of a two-stage model directory (:meth:`classifiers.two_stage.model.TwoStageModel.save`).
PATCH_NET_FILE = "patch_net.keras"
CONFIG_FILE = "config.json"


def read_two_stage_record(directory: Path | str) -> dict:
    """``config.json`` of a two-stage model directory, checked (no Keras import).

    Raises :class:`WeightsNotFoundError` when `directory` is not a two-stage model.
    """
    directory = Path(directory).expanduser()
    config, net = directory / CONFIG_FILE, directory / PATCH_NET_FILE
    if not (config.is_file() and net.is_file()):
        raise WeightsNotFoundError(
            f"'{directory}' is not a two-stage model directory (it needs {CONFIG_FILE} and "
            f"{PATCH_NET_FILE}); train one with python -m pipeline.two_stage train --out DIR"
        )
    record = json.loads(config.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("model") != "two_stage":
        raise WeightsNotFoundError(f"'{config}' is not the config of a two-stage model")
    return record


def _patch_net_file(directory: Path) -> Path:
    network = read_two_stage_record(directory)["config"].get("patch_network", "nazeri")
    if network != "nazeri":
        # Its maps have stride 32 and its trunk is not a chain of layers: this backbone's
        # stride-8 windows and layer walk do not apply.
        raise ValueError(
            f"'{directory}': the two_stage backbone takes models whose patch-wise network is the "
            f"from-scratch 'nazeri' one; this model fine-tuned {network!r}. Use its patch votes "
            f"(python -m pipeline.two_stage predict --method majority) or the ImageNet backbone "
            f"(--backbone {network}) instead"
        )
    return Path(directory).expanduser() / PATCH_NET_FILE


def extraction_defaults(directory: Path) -> dict:
    """Crops of the model's patch size (what the network was trained on), its scale (its
    magnification) and its stain normalisation."""
    config = read_two_stage_record(directory)["config"]
    return {"scale": config["scale"], "crop_size": config["patch_size"], "stain": config.get("stain")}


def _two_stage_missing() -> Path:
    raise WeightsNotFoundError(
        "the two_stage backbone has no default weights: give a trained two-stage model directory "
        "as `two_stage_model` (made by python -m pipeline.two_stage train)"
    )


def build_two_stage_features(weights_file: Path | None, input_shape=(None, None, 3)):
    """The patch-wise network of a two-stage model as a fully convolutional feature extractor.

    The layers of ``patch_net.keras`` from the input up to the 1x1 ``maps`` convolution are
    applied to an input of any size (they are all convolutions, batch normalisation in
    inference mode and ReLU), so a crop of the trained patch size gives exactly the network's
    maps of that patch.  The output concatenates, per position (8 input pixels per cell), the
    ``C`` maps and the ``16 w`` channels of the last hidden layer they are computed from; the
    extractor's global average pooling then gives ``C + 16 w`` features per crop, the first
    ``C`` being the mean of each map.

    Parameters
    ----------
    weights_file : Path
        The model directory.
    input_shape : tuple
        ``(height, width, 3)``; ``None`` sides accept any size that is a multiple of 8.
    """
    import keras

    if weights_file is None:
        raise ValueError("the two_stage backbone needs a trained model directory (`two_stage_model`)")
    net = load_network(_patch_net_file(weights_file))
    inputs = keras.Input(input_shape, name="image")
    x, hidden = inputs, None
    for layer in net.layers[1:]:  # a chain: scale, 15 x (conv, bn, relu), maps, head
        if layer.name == "maps":
            hidden = x
            x = layer(x)
            break
        x = layer(x)
    if hidden is None:
        raise ValueError(f"{weights_file}: the patch-wise network has no 'maps' layer")
    outputs = keras.layers.Concatenate(name="maps_and_hidden")([x, hidden])
    return keras.Model(inputs, outputs, name="two_stage_features")


def _identity_preprocess(x):
    # the patch-wise network scales [0, 255] itself
    return np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x


TWO_STAGE_BACKBONE = register_backbone(BackboneSpec(
    name="two_stage",
    feature_dim=0,  # C + 16 w: depends on the model (see build_two_stage_features)
    build=build_two_stage_features,
    preprocess=_identity_preprocess,
    default_weights=_two_stage_missing,
    weights_source="a trained two-stage model directory (python -m pipeline.two_stage train)",
    min_input=8,
    stride=8,
    weights_file_of=_patch_net_file,
    extraction_defaults=extraction_defaults,
))
