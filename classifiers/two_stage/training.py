"""Training machinery of the two-stage CNN: data streams, epochs, checkpoints and resume.

Kept apart from the networks (:mod:`classifiers.two_stage.model`) because it is mostly bookkeeping:

* :func:`patch_batches` streams augmented patches without holding them in memory (a BACH
  epoch at paper settings is 16 x 35 x 320 patches of 512 x 512, about 560 GB as float32);
* :func:`train_stage` runs the epochs of one network with the step learning-rate schedule,
  validation, early stopping, progress lines, and a checkpoint per finished epoch;
* :class:`CheckpointStore` writes every file atomically (temporary file, then
  ``os.replace``) and records progress in ``state.json`` *after* the model file it points to
  exists, so a run killed at any instant resumes from its last finished epoch with the
  weights, the optimizer state (Adam moments, step counter) and the epoch counter of that
  epoch.

Every random draw of an epoch comes from ``numpy.random.default_rng([seed, stream, epoch])``,
so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.files import atomic_write, atomic_write_text, remove_temporaries
from classifiers.two_stage.grid import N_DIHEDRAL, dihedral, grid_shape, patch_positions

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointMismatchError",
    "CheckpointStore",
    "EpochLog",
    "ImageCache",
    "StageSpec",
    "augmentation_plan",
    "color_jitter",
    "count_patch_batches",
    "patch_batches",
    "step_learning_rate",
    "train_stage",
    "validation_split",
]

# Seed streams: independent random sequences per purpose (numpy SeedSequence entropy).
STREAM_PATCH_EPOCH = 1
STREAM_IMAGE_AUGMENT = 2
STREAM_IMAGE_EPOCH = 3
STREAM_SPLIT = 4

_STATE_FILE = "state.json"


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random saturation, contrast and brightness change (in that order).

    Each factor is drawn from ``U(1 - strength, 1 + strength)`` and applied as PIL's
    ``ImageEnhance`` does (what Nazeri et al.'s code used, with ``strength = 0.5``):
    saturation blends with the grey (luma) image, contrast with its mean grey level,
    brightness scales towards black.  One set of factors is used for the whole array, so a
    grid of patches is perturbed like the image it came from.

    Parameters
    ----------
    image : numpy.ndarray
        ``(..., 3)`` RGB values in ``[0, 255]`` (any dtype).
    rng : numpy.random.Generator
    strength : float
        In ``[0, 1)``.

    Returns
    -------
    numpy.ndarray
        ``float32`` array, same shape, clipped to ``[0, 255]``.
    """
    saturation, contrast, brightness = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    x = np.asarray(image, dtype=np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = grey[..., None] + np.float32(saturation) * (x - grey[..., None])
    mean = np.float32((x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
    x = mean + np.float32(contrast) * (x - mean)
    x = np.float32(brightness) * x
    return np.clip(x, 0.0, 255.0, out=x)


def augmentation_plan(copies: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Dihedral transform and colour-jitter flag of every copy of `size` items.

    Copy ``j`` of an item uses transform ``(r + j) % 8`` with a random offset ``r`` per item,
    so 8 consecutive copies visit all 8 rotations/flips, and is colour-jittered when
    ``j >= copies // 2``.  With ``copies = 16`` every item is seen in its 8 orientations plain
    and in its 8 orientations colour-perturbed: the 16 variants of Nazeri et al.  With
    ``copies = 1`` the single copy has a random transform and is jittered with probability 1/2.

    Returns
    -------
    transforms, jitter : numpy.ndarray
        ``(size, copies)`` int and bool arrays.
    """
    offsets = rng.integers(0, N_DIHEDRAL, size=size)
    transforms = (offsets[:, None] + np.arange(copies)[None, :]) % N_DIHEDRAL
    if copies == 1:
        jitter = rng.random((size, 1)) < 0.5
    else:
        jitter = np.broadcast_to(np.arange(copies) >= copies // 2, (size, copies)).copy()
    return transforms, jitter


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class ImageCache:
    """Preprocessed images by index, kept in memory up to a byte budget.

    Parameters
    ----------
    paths : sequence of str
        Image files.
    loader : callable
        ``loader(path) -> (H, W, 3) uint8`` (reading, scaling, stain normalisation).
    budget_mb : float
        Images are kept after their first load while the total stays within this many MB;
        the others are re-read when needed.
    """

    def __init__(self, paths: Sequence[str], loader: Callable[[str], np.ndarray], budget_mb: float):
        self.paths = list(paths)
        self._loader = loader
        self._budget = float(budget_mb) * 2**20
        self._used = 0
        self._kept: dict[int, np.ndarray] = {}
        self._shapes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> np.ndarray:
        """The preprocessed image `index`."""
        if index in self._kept:
            return self._kept[index]
        image = self._loader(self.paths[index])
        self._shapes[index] = image.shape[:2]
        if self._used + image.nbytes <= self._budget:
            self._kept[index] = image
            self._used += image.nbytes
        return image

    def shape(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image `index` (loads it the first time)."""
        if index not in self._shapes:
            self.get(index)
        return self._shapes[index]


def validation_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation images, stratified by label, grouped by patient.

    Each group (patient) is filed under its most frequent label; of the ``n`` groups of a
    class, ``round(fraction * n)`` randomly chosen ones go to validation, at least one when
    ``n >= 2`` and never all of them, so every class keeps training images and no patient is
    on both sides.  ``fraction = 0`` gives no validation images.

    Returns
    -------
    train, val : numpy.ndarray
        Sorted image indices.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    everything = np.arange(len(labels))
    if fraction <= 0:
        return everything, everything[:0]
    rng = np.random.default_rng([seed, STREAM_SPLIT])
    frame = pd.DataFrame({"label": labels, "group": groups})
    group_label = frame.groupby("group", sort=True)["label"].agg(lambda s: s.value_counts().index[0])
    held_out = []
    for _, members in group_label.groupby(group_label, sort=True):
        n = len(members)
        n_val = min(n - 1, max(1, int(round(fraction * n)))) if n >= 2 else 0
        held_out += members.index[rng.permutation(n)[:n_val]].tolist()
    val = np.isin(groups, held_out)
    return everything[~val], everything[val]


def patch_batches(images: ImageCache, labels: np.ndarray, indices: Sequence[int], *,
                  patch_size: int, stride: int, copies: int, jitter: float, batch_size: int,
                  block: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of augmented training patches, in shuffled mini-batches.

    Every patch of every image (grid of stride `stride`) appears `copies` times per epoch with
    the transforms and jitter of :func:`augmentation_plan`.  Images are visited in a random
    order, `block` at a time; the samples of a block are shuffled together, so memory holds a
    block of images and one batch, never the epoch.

    Yields
    ------
    x : numpy.ndarray
        ``(b, k, k, 3)`` float32 in ``[0, 255]``.
    y : numpy.ndarray
        ``(b,)`` int labels.
    """
    order = rng.permutation(np.asarray(indices))
    pending_x: list[np.ndarray] = []
    pending_y: list[int] = []
    for start in range(0, len(order), block):
        members = order[start:start + block]
        samples = []
        for i in members:
            rows, cols = grid_shape(*images.shape(i), patch_size, stride)
            transforms, jittered = augmentation_plan(copies, rng, rows * cols)
            for p in range(rows * cols):
                samples += [(i, p, t, j) for t, j in zip(transforms[p], jittered[p])]
        samples = [samples[s] for s in rng.permutation(len(samples))]
        pixels = {i: images.get(i) for i in members}
        corners = {i: patch_positions(*pixels[i].shape[:2], patch_size, stride) for i in members}
        for i, p, t, j in samples:
            y, x = corners[i][p]
            patch = dihedral(pixels[i][y:y + patch_size, x:x + patch_size], t)
            pending_x.append(color_jitter(patch, rng, jitter) if j else patch.astype(np.float32))
            pending_y.append(int(labels[i]))
            if len(pending_x) == batch_size:
                yield np.stack(pending_x), np.asarray(pending_y)
                pending_x, pending_y = [], []
    if pending_x:
        yield np.stack(pending_x), np.asarray(pending_y)


def count_patch_batches(images: ImageCache, indices: Iterable[int], patch_size: int, stride: int,
                        copies: int, batch_size: int) -> int:
    """Number of batches :func:`patch_batches` yields per epoch."""
    n = sum(int(np.prod(grid_shape(*images.shape(i), patch_size, stride))) for i in indices)
    return -(-n * copies // batch_size)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class CheckpointMismatchError(ValueError):
    """A checkpoint directory belongs to a run with another config or other training images."""


def fingerprint_digest(fingerprint: dict) -> str:
    """Stable hash of a JSON-serialisable description of a run."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class CheckpointStore:
    """Per-epoch checkpoints of a training run in one directory.

    Layout: ``state.json`` (run fingerprint, per stage: epochs done, history, early-stopping
    state and the file names below), ``<stage>_net.e<epoch>.keras`` (model with optimizer
    state after that epoch), ``<stage>_net.best.e<epoch>.keras`` (best validation epoch) and
    ``image_inputs.npz`` (the image-wise network's inputs, computed once).  Files no longer
    referenced are deleted only after ``state.json`` stops pointing to them.

    Parameters
    ----------
    directory : str or os.PathLike
        Created if missing.
    fingerprint : dict
        What the run depends on (config, images, labels, split); a directory holding another
        run's state raises :class:`CheckpointMismatchError` instead of mixing the two.
    """

    def __init__(self, directory, fingerprint: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.digest = fingerprint_digest(fingerprint)
        remove_temporaries(self.directory)  # from a run killed while writing
        path = self.directory / _STATE_FILE
        if path.exists():
            self.state = json.loads(path.read_text(encoding="utf-8"))
            if self.state.get("fingerprint") != self.digest:
                raise CheckpointMismatchError(
                    f"checkpoint directory '{self.directory}' holds a run with another config or "
                    "other training images; resume with the same command, or use another output "
                    "directory (or delete that one) to start afresh"
                )
        else:
            self.state = {"fingerprint": self.digest, "stages": {}}

    def stage(self, name: str) -> dict | None:
        """Saved state of stage `name`, or None if it never finished an epoch."""
        return self.state["stages"].get(name)

    def load_model(self, filename: str):
        """Load a checkpointed model (compiled, with its optimizer state); never unpickles."""
        import keras

        return keras.models.load_model(self.directory / filename, safe_mode=True)

    def commit(self, name: str, stage_state: dict, model, best_model=None) -> None:
        """Record a finished epoch: model file(s) first, then ``state.json``, then clean up."""
        epoch = stage_state["epochs_done"]
        stage_state = dict(stage_state, checkpoint=f"{name}_net.e{epoch:04d}.keras")
        atomic_write(self.directory / stage_state["checkpoint"], model.save)
        if best_model is not None:
            stage_state["best_checkpoint"] = f"{name}_net.best.e{epoch:04d}.keras"
            atomic_write(self.directory / stage_state["best_checkpoint"], best_model.save)
        elif "best_checkpoint" in self.state["stages"].get(name, {}):
            stage_state["best_checkpoint"] = self.state["stages"][name]["best_checkpoint"]
        self.state["stages"][name] = stage_state
        atomic_write_text(self.directory / _STATE_FILE, json.dumps(self.state, indent=2))
        keep = {s.get(k) for s in self.state["stages"].values() for k in ("checkpoint", "best_checkpoint")}
        for stale in self.directory.glob(f"{name}_net.*.keras"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)

    def save_arrays(self, name: str, **arrays: np.ndarray) -> None:
        """Atomically store arrays as ``<name>.npz``."""
        atomic_write(self.directory / f"{name}.npz", lambda tmp: np.savez(tmp, **arrays))

    def load_arrays(self, name: str) -> dict | None:
        """Arrays stored by :meth:`save_arrays`, or None."""
        path = self.directory / f"{name}.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------------------------
# Epoch loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """How one network is trained.

    Parameters
    ----------
    name : str
        ``"patch"`` or ``"image"`` (also names checkpoint files and log lines).
    epochs : int
        Maximum number of epochs.
    learning_rate, decay, decay_every : float, float, int
        Learning rate of epoch ``e`` (0-based) is ``learning_rate * decay ** (e // decay_every)``.
    patience : int or None
        Early stopping: stop after this many epochs without a better validation accuracy
        (ties broken by lower validation loss) and keep the best epoch's weights.  None: off.
    """

    name: str
    epochs: int
    learning_rate: float
    decay: float
    decay_every: int
    patience: int | None = None


@dataclass(frozen=True)
class EpochLog:
    """What :func:`train_stage` reports after every finished epoch (1-based `epoch`)."""

    stage: str
    epoch: int
    epochs: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    learning_rate: float
    optimizer_steps: int
    seconds: float
    best_epoch: int | None

    def line(self) -> str:
        """One progress line, e.g. ``patch-wise epoch 3/30: loss 0.8123 ...``."""
        text = (f"{self.stage}-wise epoch {self.epoch}/{self.epochs}: loss {self.loss:.4f}, "
                f"accuracy {self.accuracy:.3f}")
        if self.val_accuracy is not None:
            text += f", val loss {self.val_loss:.4f}, val accuracy {self.val_accuracy:.3f}"
        return text + f" (lr {self.learning_rate:.0e}, {self.seconds:.1f} s)"


def step_learning_rate(spec: StageSpec, epoch: int) -> float:
    """Learning rate of 0-based `epoch` (step decay)."""
    return float(spec.learning_rate * spec.decay ** (epoch // spec.decay_every))


def _better(val: tuple[float, float], best: dict | None) -> bool:
    loss, acc = val
    if best is None:
        return True
    return acc > best["val_accuracy"] or (acc == best["val_accuracy"] and loss < best["val_loss"])


def train_stage(model, spec: StageSpec, batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
                n_batches: int, evaluate: Callable | None = None, store: CheckpointStore | None = None,
                on_epoch_end: Callable[[EpochLog], None] | None = None, progress: bool = False):
    """Train a compiled Keras model for the epochs of `spec`, resuming from `store`.

    Parameters
    ----------
    model : keras.Model
        Freshly built and compiled; replaced by the checkpointed model when resuming.
    spec : StageSpec
    batches : callable
        ``batches(epoch)`` iterates the ``(x, y)`` mini-batches of 0-based `epoch`; it must
        depend only on `epoch` so that resumed epochs see the same data.
    n_batches : int
        Batches per epoch (for the progress bar).
    evaluate : callable, optional
        ``evaluate(model) -> (val_loss, val_accuracy)``; None when there is no validation set.
    store : CheckpointStore, optional
        Where to checkpoint each finished epoch and resume from.
    on_epoch_end : callable, optional
        Called with an :class:`EpochLog` after the epoch's checkpoint is written.
    progress : bool
        Show a progress bar over the batches of each epoch.

    Returns
    -------
    model : keras.Model
        The trained model (best validation epoch when early stopping is on).
    history : list of dict
        One :class:`EpochLog` dict per epoch, including those before a resume.
    """
    state = store.stage(spec.name) if store is not None else None
    history: list[dict] = []
    best: dict | None = None
    best_weights = None
    start = 0
    if state is not None:
        model = store.load_model(state["checkpoint"])
        history, best, start = list(state["history"]), state.get("best"), int(state["epochs_done"])
        if best is not None and "best_checkpoint" in state:
            best_weights = store.load_model(state["best_checkpoint"]).get_weights()
        if state.get("finished"):
            return model, history
        log.info("%s-wise network: resuming after epoch %d of %d", spec.name, start, spec.epochs)

    stop = False
    for epoch in range(start, spec.epochs):
        tic = time.perf_counter()
        lr = step_learning_rate(spec, epoch)
        model.optimizer.learning_rate.assign(lr)
        seen, loss_sum, correct = 0, 0.0, 0.0
        for x, y in _maybe_progress(batches(epoch), n_batches, f"{spec.name} {epoch + 1}/{spec.epochs}",
                                    progress):
            model.reset_metrics()  # so that the returned values are this batch's
            logs = model.train_on_batch(x, y, return_dict=True)
            seen += len(y)
            loss_sum += float(logs["loss"]) * len(y)
            correct += float(logs["accuracy"]) * len(y)
        if seen == 0:
            raise ValueError(f"{spec.name}-wise network: an epoch has no training samples")
        val = evaluate(model) if evaluate is not None else None
        improved = spec.patience is not None and val is not None and _better(val, best)
        if improved:
            best = {"epoch": epoch + 1, "val_loss": float(val[0]), "val_accuracy": float(val[1])}
            best_weights = model.get_weights()
        record = EpochLog(
            stage=spec.name, epoch=epoch + 1, epochs=spec.epochs, loss=loss_sum / seen,
            accuracy=correct / seen, val_loss=None if val is None else float(val[0]),
            val_accuracy=None if val is None else float(val[1]), learning_rate=lr,
            optimizer_steps=int(model.optimizer.iterations.numpy()),
            seconds=time.perf_counter() - tic, best_epoch=None if best is None else best["epoch"],
        )
        history.append(asdict(record))
        stop = best is not None and epoch + 1 - best["epoch"] >= spec.patience
        finished = stop or epoch + 1 == spec.epochs
        if finished and best_weights is not None:
            model.set_weights(best_weights)  # early stopping keeps the best epoch
        if store is not None:
            store.commit(spec.name, {"epochs_done": epoch + 1, "history": history, "best": best,
                                     "finished": finished}, model, model if improved and not finished else None)
        log.info("%s%s", record.line(), " - stopping early" if stop and epoch + 1 < spec.epochs else "")
        if on_epoch_end is not None:
            on_epoch_end(record)
        if stop:
            break
    return model, history


def _maybe_progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)
