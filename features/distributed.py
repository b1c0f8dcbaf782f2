"""Feature extraction on a ``dask.distributed`` cluster: one task per image, same store.

The client plans the run exactly as :func:`features.extract.extract_to_store` does (hash the
source files, skip the images already in the store), then submits one task per remaining
image.  A task builds -- once per worker process -- a :class:`~features.extract.FeatureExtractor`
for the config, runs :func:`~features.extract.extract_one_image` (the single-process
computation, so the features are equal bit for bit) and writes the image's record itself,
atomically, into the store.  The store must therefore be on a filesystem every worker and the
client see under the same path (one machine, or a shared mount).

A worker that dies (killed, out of memory, machine lost) costs only the images it was working
on: every finished image is already on disk, and the scheduler reruns the lost tasks on other
workers.  A task whose workers died more than ``distributed.scheduler.allowed-failures`` times
(dask's default: 3) is reported as a skipped image, and the rest of the run completes.

Workers should be processes with one thread each (``--nthreads 1``): TensorFlow releases the
GIL only in parts, and each thread would otherwise need its own batch memory.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
from tqdm.auto import tqdm

from features.config import ExtractionConfig
from features.extract import (
    ExtractionSummary,
    FeatureExtractor,
    Preprocessing,
    make_extractor,
    check_batch_size,
    extract_one_image,
    plan_extraction,
    write_image_record,
)
from features.store import FeatureStore

log = logging.getLogger(__name__)

#: ``--dask local:N`` starts a LocalCluster of N worker processes on loopback.
LOCAL_PREFIX = "local:"


class DaskConnectionError(ValueError):
    """The dask scheduler given with ``--dask`` cannot be reached."""


@dataclass(frozen=True)
class ImageTask:
    """What a worker needs to extract one image (plain data, cheap to send)."""

    image_id: str
    path: str
    label: str
    group: str
    source_sha256: str
    magnification: str = ""


@dataclass(frozen=True)
class ImageOutcome:
    """What a worker reports back; the features themselves stay in the store.

    Attributes
    ----------
    image_id : str
    skip_reason : why the image could not be read, else ``None`` (the record was written).
    stain_note : why Macenko was not applied, else ``None``.
    crops : crops run through the backbone by this task (0 when the record already existed).
    device : the worker's TensorFlow device.
    worker : the worker's address.
    """

    image_id: str
    skip_reason: str | None
    stain_note: str | None
    crops: int
    device: str
    worker: str


# Per worker process: the extractor of the last config seen, so the backbone is built once per
# worker and not once per image.  A cache, not configuration: it is rebuilt on a config change.
_EXTRACTOR_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def worker_extractor(config: ExtractionConfig, batch_size: int) -> tuple[FeatureExtractor, Preprocessing]:
    """This process's extractor and preprocessing for ``config``, built on first use."""
    key = (config.config_hash, batch_size)
    with _CACHE_LOCK:
        if key not in _EXTRACTOR_CACHE:
            _EXTRACTOR_CACHE.clear()  # one backbone in memory per worker
            _EXTRACTOR_CACHE[key] = (make_extractor(config, batch_size=batch_size),
                                     Preprocessing.from_config(config))
        return _EXTRACTOR_CACHE[key]


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:  # called outside a worker (tests, debugging)
        return f"pid {os.getpid()}"


def extract_image_task(task: ImageTask, config: ExtractionConfig, store_root: str,
                       batch_size: int) -> ImageOutcome:
    """Worker side: extract one image and write its record into the shared store.

    Idempotent, since the scheduler may run it again after a worker died: an image whose record
    for the same source file already exists is not recomputed, and a rewrite would be the same
    bytes anyway (extraction is deterministic and the write is an atomic rename).
    """
    # No store.open() here: the client opened the store, and open() removes temporary files
    # that other workers may be writing right now.
    store = FeatureStore(store_root, config)
    worker = _worker_address()
    if (stored := _stored_outcome(store, task.image_id, task.source_sha256, worker)) is not None:
        return stored
    extractor, prep = worker_extractor(config, batch_size)
    result = extract_one_image(task, config, extractor, prep)
    if result.skip_reason is None:
        write_image_record(store, task, task.source_sha256, result.features, result.stain_note)
    return ImageOutcome(task.image_id, result.skip_reason, result.stain_note, result.crops,
                        extractor.device, worker)


def _stored_outcome(store: FeatureStore, image_id: str, source_sha256: str,
                    worker: str) -> ImageOutcome | None:
    """The outcome of an image whose record is already in the store, else ``None``."""
    if not store.is_done(image_id, source_sha256):
        return None
    note = store.read(image_id).get("stain_note")
    return ImageOutcome(image_id, None, note, 0, "", worker)


def _task_key(image_id: str) -> str:
    # Readable on the dashboard, unique per submission (a rerun never reuses an old result).
    readable = re.sub(r"[^A-Za-z0-9._]+", "_", image_id)[-40:]
    return f"extract-image-{readable}-{uuid.uuid4().hex[:12]}"


def extract_on_dask(
    dataset: pd.DataFrame,
    config: ExtractionConfig,
    store_root: Path | str,
    client,
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> ExtractionSummary:
    """Extract every image of ``dataset`` not yet in the store, one dask task per image.

    Produces the same store as :func:`features.extract.extract_to_store` (bit for bit) and the
    same summary, with ``device`` naming the workers used.

    Parameters
    ----------
    dataset : columns ``image_id, path, label, group`` (``data.datasets.load_dataset``); the
        paths must be readable by every worker.
    config : the resolved extraction config.
    store_root : store root, on a filesystem all workers see under the same path.
    client : a connected ``distributed.Client``.
    batch_size : crops per forward pass on each worker: ``config.batch_size`` (part of the store
        key); another value is an error.
    progress : show a progress bar.

    Raises
    ------
    Exception
        The first error of a task other than a dead worker (a wrong weights file on a worker,
        say); the remaining tasks are cancelled and the finished images stay in the store.
    """
    check_batch_size(config, batch_size)
    # The client holds the store's lock for the whole run; workers write records under it.
    with FeatureStore(store_root, config).open() as store:
        store.write_dataset(dataset["image_id"])
        return _extract_locked(store, dataset, config, store_root, client, config.batch_size, progress)


def _extract_locked(store, dataset, config, store_root, client, batch_size, progress):
    from distributed import KilledWorker, as_completed

    summary = ExtractionSummary(store_path=store.path)
    todo, hashes = plan_extraction(dataset, store, summary)
    root = str(Path(store_root).resolve())
    futures = {}
    outcomes: dict[str, ImageOutcome] = {}
    if todo:
        start = time.perf_counter()
        for row in todo:
            task = ImageTask(row.image_id, str(row.path), row.label, row.group, hashes[row.image_id],
                             str(getattr(row, "magnification", "") or ""))
            future = client.submit(extract_image_task, task, config, root, batch_size,
                                   key=_task_key(row.image_id), pure=False)
            futures[future] = row.image_id
        bar = tqdm(total=len(todo), unit="img", disable=not progress, desc=f"{config.backbone} (dask)")
        try:
            for future in as_completed(list(futures)):
                image_id = futures.pop(future)
                try:
                    outcome = future.result()
                except KilledWorker as exc:
                    # A worker can die after writing the record but before reporting it: the
                    # store is the truth.  Otherwise this image keeps killing workers: skip it.
                    outcome = (_stored_outcome(store, image_id, hashes[image_id], "")
                               or ImageOutcome(image_id, _killed_reason(exc), None, 0, "", ""))
                future.release()  # nothing to keep: a lost worker must not make dask recompute it
                outcomes[image_id] = outcome
                summary.crops += outcome.crops
                summary.seconds = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(crops_per_s=f"{summary.crops_per_second:.1f}")
        finally:
            if futures:  # an error or Ctrl-C: stop the rest, finished images stay stored
                client.cancel(list(futures))
            bar.close()
        summary.seconds = time.perf_counter() - start
    _fill_summary(summary, todo, outcomes)
    store.write_skipped(summary.skipped)
    return summary


def _killed_reason(exc) -> str:
    allowed = getattr(exc, "allowed_failures", None)
    count = f"{allowed + 1} dask worker(s)" if isinstance(allowed, int) else "dask workers"
    return (f"{count} died while extracting this image (out of memory?); see the worker logs, "
            "or raise distributed.scheduler.allowed-failures; a rerun tries it again")


def _fill_summary(summary: ExtractionSummary, todo: list, outcomes: dict) -> None:
    """Fill ``summary`` in dataset order, as the single-process run lists it (after the files
    that could not be hashed, already in ``summary.skipped``)."""
    for row in todo:
        outcome = outcomes[row.image_id]
        if outcome.skip_reason is not None:
            summary.skipped.append({"image_id": row.image_id, "path": row.path,
                                    "reason": outcome.skip_reason})
            log.warning("skipped %s: %s", row.path, outcome.skip_reason)
            continue
        summary.done.append(row.image_id)
        if outcome.stain_note:
            summary.unnormalized.append({"image_id": row.image_id, "reason": outcome.stain_note})
    workers = {o.worker for o in outcomes.values() if o.worker}
    devices = sorted({o.device for o in outcomes.values() if o.device})
    if workers:
        summary.device = f"{len(workers)} dask worker(s), {', '.join(devices) or 'records found'}"


def parse_dask_spec(spec: str) -> tuple[str, int | str]:
    """``"local:N"`` -> ``("local", N)``; anything else is a scheduler address -> ``("address", spec)``."""
    if spec.startswith(LOCAL_PREFIX):
        count = spec[len(LOCAL_PREFIX):]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"`dask` {spec}: expected local:N with N >= 1 worker processes")
        return "local", int(count)
    if not spec.strip():
        raise ValueError("`dask` needs a scheduler address (tcp://HOST:PORT) or local:N")
    return "address", spec


@contextmanager
def dask_client(spec: str) -> Iterator:
    """A ``distributed.Client`` for ``--dask SPEC``, closed (with its cluster) on exit.

    ``local:N`` starts a LocalCluster of N single-threaded worker processes on 127.0.0.1 with
    no dashboard; anything else is the address of a running scheduler (``tcp://host:8786``).
    The ``distributed`` logger is set to warnings: the cluster's start/stop INFO lines would
    bury the run's progress and summary.
    """
    import distributed  # noqa: F401  (its import sets the logger's level from dask's config)

    kind, value = parse_dask_spec(spec)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with _client(kind, value) as client:
        yield client


@contextmanager
def _client(kind: str, value):
    from distributed import Client, LocalCluster

    if kind == "local":
        with LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            yield client
    else:
        try:
            client = Client(value)
        except OSError as exc:  # includes timeouts: nothing listening, wrong host or port
            raise DaskConnectionError(f"cannot connect to the dask scheduler at {value}: {exc}") from exc
        with client:
            yield client
