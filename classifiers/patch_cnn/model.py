"""The small patch ConvNet of Glavcheva, Yaloveha and Podorozhniak: tumour vs non-tumour 32x32.

Design notes: docs/patch-cnn.md, "Design notes: the network".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from classifiers.model_files import load_model_directory, save_model_directory
from classifiers.patch_cnn.annotations import (
    AnnotationError,
    NoAnnotationsError,
    PatchSampling,
    PointAnnotations,
    read_annotations,
    sample_patches,
)

#: Input side fixed by the architecture (2304 = 6 x 6 x 64 flattened values).
PATCH_SIZE = 32
CLASSES = ("non-tumour", "tumour")
#: Written in ``patch_cnn.json`` so another JSON file is not mistaken for a model.
MODEL_KIND = "breast-histology-pipeline patch cnn"
MODEL_FORMAT_VERSION = 1
NETWORK_FILE, RECORD_FILE = "patch_cnn.keras", "patch_cnn.json"


@dataclass(frozen=True)
class PatchCNNConfig:
    """Training settings (paper defaults).

    Parameters
    ----------
    epochs, batch_size : int
    learning_rate : float
        Adam's learning rate (Keras' default; the paper names Adam only).
    dropout : float
        Rate of the dropout layer.
    val_fraction, test_fraction : float
        Shares of the *images* held out for validation and test.
    scale : float
        Resize applied to every image before patches are cut (and before heatmaps).
    seed : int
        Weights, split, patch sampling and batch order.
    """

    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    dropout: float = 0.5
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.val_fraction >= 0 and self.test_fraction >= 0
             and self.val_fraction + self.test_fraction < 1, "val + test fractions must be in [0, 1)"),
            (0 < self.scale <= 4, "scale must be in (0, 4]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid patch ConvNet config: {message}")

    @classmethod
    def from_dict(cls, record: dict) -> "PatchCNNConfig":
        unknown = sorted(set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"patch ConvNet config has fields this version does not know: {unknown}")
        return cls(**record)


def build_patch_cnn(dropout: float = 0.5):
    """The uncompiled Keras network of the module docstring (uint8-range input, P(tumour))."""
    import keras
    from keras import layers

    inputs = keras.Input((PATCH_SIZE, PATCH_SIZE, 3), name="patch")
    x = layers.Rescaling(1 / 255, name="to_unit")(inputs)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 2, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, strides=1, padding="same", name="pool2")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.MaxPooling2D(2, name="pool3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="tumour")(x)
    return keras.Model(inputs, outputs, name="patch_cnn")


def split_by_image(image_ids, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Seeded split of image ids into ``train`` / ``val`` / ``test`` lists.

    Counts are rounded shares of the images, keeping at least one training image; with few
    images validation or test may be empty (the report says so).
    """
    ids = sorted(set(map(str, image_ids)))
    order = [ids[i] for i in np.random.default_rng([seed, 1]).permutation(len(ids))]
    n_test = min(int(round(len(ids) * test_fraction)), max(0, len(ids) - 1))
    n_val = min(int(round(len(ids) * val_fraction)), max(0, len(ids) - 1 - n_test))
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass
class PatchDataset:
    """Patches of several images: ``patches`` uint8 (n, 32, 32, 3), ``labels`` (1 = tumour),
    ``image_ids`` (image of each patch), plus what was skipped and how files were read."""

    patches: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray
    skipped: list = field(default_factory=list)
    conventions: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)


def pair_annotation_files(images_dir, annotations_dir=None) -> tuple[list, list]:
    """Match ``<stem>.<image ext>`` with ``<stem>.json`` (BreCaHAD: ``images/`` + ``groundTruth/``).

    Returns
    -------
    pairs : list of (image_id, image_path, json_path)
    skipped : list of dict
        Images without annotation file and annotation files without image.
    """
    from data.io import is_image_file

    images_dir = Path(images_dir)
    annotations_dir = Path(annotations_dir) if annotations_dir else images_dir
    for d in (images_dir, annotations_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d}")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.is_file() and is_image_file(p)}
    notes = {p.stem: p for p in sorted(annotations_dir.glob("*.json")) if p.is_file()}
    pairs = [(stem, images[stem], notes[stem]) for stem in sorted(images) if stem in notes]
    skipped = [{"image": str(images[s]), "reason": f"no annotation file {s}.json in {annotations_dir}"}
               for s in sorted(set(images) - set(notes))]
    skipped += [{"image": str(notes[s]), "reason": f"annotation file without an image {s}.* in {images_dir}"}
                for s in sorted(set(notes) - set(images))]
    return pairs, skipped


def _resized(notes: PointAnnotations, height: int, width: int) -> PointAnnotations:
    factor = np.array([height / notes.height, width / notes.width])
    points = {c: p * factor for c, p in notes.points.items()}
    return PointAnnotations(points, height, width, notes.convention, notes.source, notes.dropped)


def build_patch_dataset(pairs, sampling: PatchSampling, *, scale: float = 1.0, convention: str = "auto",
                        outside: str = "error", seed: int = 0) -> PatchDataset:
    """Read every (image, annotation) pair and sample its patches.

    Images that cannot be read or have no annotated object are skipped with the reason; any
    invalid annotation file is an error listing *every* bad file, raised before training.
    Each image's patches are drawn from ``default_rng([seed, hash(image id)])``, so they do
    not depend on which other images are present.

    Raises
    ------
    AnnotationError
        One or more annotation files are invalid (the message lists them all).
    ValueError
        No image gave any patch.
    """
    from data.io import ImageReadError, read_image
    from features.augment import image_seed
    from features.transforms import scale_image

    blocks, skipped, errors, conventions, dropped = [], [], [], {}, []
    for image_id, image_path, json_path in pairs:
        try:
            raw = read_image(image_path)
            notes = read_annotations(json_path, raw.shape[0], raw.shape[1], convention=convention, outside=outside)
            image = scale_image(raw, scale)
            notes = _resized(notes, *image.shape[:2])
            rng = np.random.default_rng([seed, image_seed(image_id)])
            patches, labels, _ = sample_patches(image, notes, sampling, rng)
        except (ImageReadError, NoAnnotationsError) as exc:
            skipped.append({"image": str(image_path), "reason": str(exc)})
            continue
        except AnnotationError as exc:
            errors.append(str(exc))
            continue
        except ValueError as exc:  # image smaller than a patch
            skipped.append({"image": str(image_path), "reason": str(exc)})
            continue
        conventions[image_id] = notes.convention
        dropped += [{"image": image_id, **d} for d in notes.dropped]
        blocks.append((patches, labels, np.full(len(labels), image_id, dtype=object)))
    if errors:
        raise AnnotationError(f"{len(errors)} invalid annotation file(s):\n  " + "\n  ".join(errors))
    if not blocks:
        raise ValueError("no image gave any patch: " + "; ".join(f"{s['image']}: {s['reason']}" for s in skipped))
    return PatchDataset(np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]),
                        np.concatenate([b[2] for b in blocks]), skipped, conventions, dropped)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


class PatchCNN:
    """The patch ConvNet with its config, training record, and file format.

    Attributes
    ----------
    config : PatchCNNConfig
    network : keras.Model
        Built by :meth:`build` or :meth:`load`.
    record : dict
        Split, history, metrics and data summary (saved in ``patch_cnn.json``).
    """

    classes = CLASSES
    patch_size = PATCH_SIZE

    def __init__(self, config: PatchCNNConfig | None = None, network=None, record: dict | None = None):
        self.config = config or PatchCNNConfig()
        self.network = network
        self.record = dict(record or {})

    def build(self) -> "PatchCNN":
        """Fresh network, weights seeded by ``config.seed``."""
        import keras

        keras.utils.set_random_seed(self.config.seed)
        self.network = build_patch_cnn(self.config.dropout)
        return self

    def fit(self, data: PatchDataset, *, verbose: int = 0) -> "PatchCNN":
        """Split ``data`` by image, train a fresh network, and record split sizes and accuracies.

        ``record["metrics"]`` holds the patch accuracy and patch / image / tumour counts of
        each split (``None`` accuracy for an empty split).
        """
        config = self.config
        split = split_by_image(data.image_ids, config.val_fraction, config.test_fraction, config.seed)
        masks = {name: np.isin(data.image_ids, ids) for name, ids in split.items()}
        self.build()
        val = (data.patches[masks["val"]], data.labels[masks["val"]])
        self.fit_patches(data.patches[masks["train"]], data.labels[masks["train"]], validation=val, verbose=verbose)
        metrics = {}
        for name, mask in masks.items():
            x, y = data.patches[mask], data.labels[mask]
            metrics[name] = {"images": len(split[name]), "patches": int(mask.sum()), "tumour_patches": int(y.sum()),
                             "accuracy": self.accuracy(x, y)}
        self.record.update(split=split, metrics=metrics, skipped=data.skipped,
                           conventions=data.conventions, dropped_points=data.dropped)
        return self

    def fit_patches(self, x: np.ndarray, y: np.ndarray, validation: tuple | None = None, verbose: int = 0) -> dict:
        """Train with Adam and binary cross-entropy; returns the per-epoch history."""
        import keras

        if self.network is None:
            self.build()
        keras.utils.set_random_seed(self.config.seed)  # batch order and dropout masks
        self.network.compile(optimizer=keras.optimizers.Adam(self.config.learning_rate),
                             loss="binary_crossentropy", metrics=["accuracy"])
        validation = None if validation is None or len(validation[1]) == 0 else \
            (np.asarray(validation[0], np.float32), np.asarray(validation[1], np.float32))
        history = self.network.fit(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   batch_size=self.config.batch_size, epochs=self.config.epochs,
                                   validation_data=validation, shuffle=True, verbose=verbose)
        self.record["history"] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        return self.record["history"]

    def predict_proba(self, patches: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """``(n, 32, 32, 3)`` RGB patches (0-255) -> ``(n, 2)`` probabilities of :attr:`classes`."""
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3):
            raise ValueError(f"the patch ConvNet takes (n, {PATCH_SIZE}, {PATCH_SIZE}, 3) patches, got "
                             f"{patches.shape}")
        parts = [np.asarray(self.network(patches[i:i + batch_size].astype(np.float32), training=False))[:, 0]
                 for i in range(0, len(patches), batch_size)]
        p = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return np.column_stack([1.0 - p, p]).astype(np.float32)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float | None:
        """Share of patches whose most probable class is the label (``None`` without patches)."""
        if len(y) == 0:
            return None
        return float(np.mean(self.predict_proba(x).argmax(axis=1) == np.asarray(y)))

    # -- files -----------------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write ``patch_cnn.keras`` then ``patch_cnn.json``, each atomically."""
        record = {"kind": MODEL_KIND, "format_version": MODEL_FORMAT_VERSION,
                  "classes": list(CLASSES), "patch_size": PATCH_SIZE, "n_parameters": int(self.network.count_params()),
                  "config": asdict(self.config), **{k: v for k, v in self.record.items() if k != "config"}}
        return save_model_directory(directory, {NETWORK_FILE: self.network}, RECORD_FILE, record)

    @classmethod
    def load(cls, directory) -> "PatchCNN":
        """Read what :meth:`save` wrote (Keras ``safe_mode=True``: no code is run).

        Raises
        ------
        FileNotFoundError, ValueError
            Not a patch ConvNet directory, another format version, or a network of another shape.
        """
        directory = Path(directory)
        record, networks = load_model_directory(directory, RECORD_FILE, {"kind": MODEL_KIND, "format_version": MODEL_FORMAT_VERSION},
                                                "patch ConvNet model", (NETWORK_FILE,))
        network = networks[NETWORK_FILE]
        if tuple(network.input_shape[1:]) != (PATCH_SIZE, PATCH_SIZE, 3) or tuple(network.output_shape[1:]) != (1,):
            raise ValueError(f"{directory / NETWORK_FILE} maps {network.input_shape} to {network.output_shape}, "
                             f"not ({PATCH_SIZE}, {PATCH_SIZE}, 3) patches to one probability")
        config = PatchCNNConfig.from_dict(record["config"])
        extra = {k: v for k, v in record.items() if k not in ("kind", "format_version", "config")}
        return cls(config, network, extra)

    # -- the model protocol (classifiers.protocol.Model) -------------------------------------------

    kind = "patch_cnn"

    def predict_images(self, inputs, *, weights=None, batch_size=None, progress: bool = False):
        """Image files or folders -> the one predictions table: an image's non-overlapping
        32-pixel windows (the heatmap grid at step 32, after ``config.scale``) vote like the
        augmentations of a deep-feature model (``n_aug`` = windows).  ``batch_size`` and
        ``progress`` do not apply."""
        from classifiers.predictions import predict_inputs

        if weights:
            raise ValueError("`weights` is for deep-feature models; a patch ConvNet holds its own weights")
        return predict_inputs(inputs, self._predict_paths)

    def _predict_paths(self, paths):
        import time

        from classifiers.evaluation.voting import vote
        from classifiers.heatmaps import window_crops, window_grid
        from classifiers.predictions import PredictionResult, predictions_table
        from data.io import ImageReadError, read_image
        from features.extract import describe_device
        from features.transforms import scale_image

        start, images, blocks, skipped = time.perf_counter(), [], [], []
        for path in paths:
            try:
                image = scale_image(read_image(path), self.config.scale)
            except ImageReadError as exc:
                skipped.append({"image": path, "reason": exc.reason})
                continue
            grid = window_grid(image.shape[0], image.shape[1], PATCH_SIZE, PATCH_SIZE)
            blocks.append(self.predict_proba(window_crops(image, grid)))
            images.append(path)
        classes, device = tuple(self.classes), describe_device()
        if not images:
            return PredictionResult(predictions_table([], None, classes, 0), skipped, classes,
                                    seconds=time.perf_counter() - start, device=device)
        counts = np.array([len(b) for b in blocks])
        row_image, row_proba = np.repeat(np.arange(len(images)), counts), np.concatenate(blocks)
        table = predictions_table(images, vote(row_image, row_proba, len(images)), classes, counts,
                                  stain_note=[""] * len(images))
        return PredictionResult(table, skipped, classes, row_proba, row_image, time.perf_counter() - start, device)

    def heatmaps(self, *, window=None, step=None, **_):
        """32-pixel windows, step 8, through the network."""
        from classifiers.model_heatmaps import PatchCNNHeatmaps

        return PatchCNNHeatmaps(self, window=window, step=step)


def train_patch_cnn(dataset: PatchDataset, config: PatchCNNConfig, *, verbose: int = 0) -> PatchCNN:
    """``PatchCNN(config).fit(dataset)``: split by image, train, record splits and accuracies."""
    return PatchCNN(config).fit(dataset, verbose=verbose)
