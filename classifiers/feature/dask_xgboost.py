"""XGBoost trained on a ``dask.distributed`` cluster with ``xgboost.dask``.

The result is an ordinary fitted :class:`~classifiers.feature.estimators.XGBoostFeatureClassifier` (same
parameters and defaults, booster loaded from the cluster's), so saving, loading and
prediction (:mod:`classifiers.feature.model_io`, :mod:`classifiers.feature.predict`) do not know or care
where it was trained.

The feature rows are cut into one partition per worker (by default) and each partition
(features with its labels) is sent to one worker; XGBoost's ``hist`` algorithm then builds
every tree collectively, each worker computing the histograms of its own rows.  The client
still loads the stores (as :func:`features.store.load_store` does), so what scales out is the
boosting, not the loading.  Trees differ slightly from a single-process fit (quantile sketches
are merged across workers and row subsampling draws per worker) but are the same model.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.base import clone

from classifiers.evaluation.cross_validation import CVConfig, FittedModel, RunSpec
from classifiers.feature.estimators import (
    DEVICE_CHOICES,
    DeviceChoice,
    DeviceUnavailableError,
    XGBoostFeatureClassifier,
    booster_device,
    make_classifier,
    probe_xgboost_gpu,
)

logger = logging.getLogger(__name__)


def _probe_worker() -> tuple:
    choice = probe_xgboost_gpu()
    return choice.device, choice.reason


def resolve_dask_device(client, requested: str = "auto") -> DeviceChoice:
    """The XGBoost device for the cluster: ``cuda`` only if every worker can train there.

    Parameters
    ----------
    client : distributed.Client
    requested : {"auto", "cpu", "cuda"}
        As in :func:`classifiers.feature.estimators.resolve_xgboost_device`, but probed on the workers
        (the client's own hardware does not matter).

    Raises
    ------
    DeviceUnavailableError
        ``cuda`` was requested and some worker has no usable GPU.
    """
    if requested not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {requested!r}")
    if requested == "cpu":
        return DeviceChoice("cpu", "cpu requested")
    probes = client.run(_probe_worker)
    lacking = {w: reason for w, (device, reason) in probes.items() if device != "cuda"}
    if not lacking:
        choice = DeviceChoice("cuda", f"every dask worker ({len(probes)}) can train on a GPU")
    elif requested == "cuda":
        raise DeviceUnavailableError(
            "device='cuda' was requested but some dask workers cannot use a GPU: "
            + "; ".join(f"{w}: {r}" for w, r in sorted(lacking.items()))
        )
    else:
        choice = DeviceChoice("cpu", f"no GPU on {len(lacking)} of {len(probes)} dask workers: "
                                     f"{next(iter(lacking.values()))}")
    logger.info("XGBoost device on dask: %s (%s)", choice.device, choice.reason)
    return choice


def scatter_partitions(client, X: np.ndarray, y: np.ndarray, n_partitions: int | None = None):
    """Cut rows into partitions, send each (features and labels together) to one worker.

    Returns
    -------
    X_dask, y_dask : dask arrays with the same row chunks
    futures : the scattered blocks; keep them until training is done
    """
    import dask.array as da

    workers = sorted(client.nthreads())
    if not workers:
        raise ValueError("the dask cluster has no worker")
    n_partitions = min(len(X), n_partitions or len(workers))
    bounds = np.linspace(0, len(X), n_partitions + 1).round().astype(int)
    x_parts, y_parts, futures = [], [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        # Both blocks of a partition on the same worker; hash=False: equal label blocks must
        # not collapse onto one key (and one worker).
        where = [workers[i % len(workers)]]
        fx = client.scatter(X[a:b], workers=where, hash=False)
        fy = client.scatter(y[a:b], workers=where, hash=False)
        futures += [fx, fy]
        x_parts.append(da.from_delayed(fx, shape=(b - a, X.shape[1]), dtype=X.dtype))
        y_parts.append(da.from_delayed(fy, shape=(b - a,), dtype=y.dtype))
    return da.concatenate(x_parts), da.concatenate(y_parts), futures


def fit_xgboost_on_dask(
    client,
    X,
    y,
    params: XGBoostFeatureClassifier | None = None,
    *,
    n_partitions: int | None = None,
) -> XGBoostFeatureClassifier:
    """Fit an :class:`XGBoostFeatureClassifier` with ``xgboost.dask.DaskXGBClassifier``.

    Parameters
    ----------
    client : distributed.Client
    X : array (n_rows, n_features)
    y : array (n_rows,) of class labels (any hashable values, e.g. strings)
    params : XGBoostFeatureClassifier, optional
        Unfitted estimator whose parameters to use (its defaults when omitted).  ``device`` is
        resolved on the workers (:func:`resolve_dask_device`); each worker trains with its
        own thread count, while ``n_jobs`` stays the model's prediction threads.
    n_partitions : int, optional
        Row partitions; one per worker by default.

    Returns
    -------
    XGBoostFeatureClassifier
        Fitted, with ``booster_`` an ``xgboost.XGBClassifier`` holding the trained trees.

    Raises
    ------
    ValueError
        Bad parameters, non-finite features, fewer than two classes, no worker.
    DeviceUnavailableError
        ``device="cuda"`` and some worker has no GPU.
    """
    import xgboost
    from xgboost import dask as dxgb

    model = clone(params) if params is not None else XGBoostFeatureClassifier()
    X, y, encoder = model._training_data(X, y)
    device = resolve_dask_device(client, model.device).device
    X_dask, y_dask, futures = scatter_partitions(client, X, encoder.transform(y).astype(np.int32), n_partitions)
    distributed_model = dxgb.DaskXGBClassifier(**model.booster_params(device))
    distributed_model.client = client
    try:
        distributed_model.fit(X_dask, y_dask)
    finally:
        client.cancel(futures)
    booster = distributed_model.get_booster()
    used = booster_device(booster)
    if device == "cuda" and not used.startswith("cuda"):
        raise DeviceUnavailableError(f"XGBoost was asked for device='cuda' but trained on {used!r}")
    # A plain XGBClassifier around the same trees: what model_io saves and predict uses.
    local = xgboost.XGBClassifier()
    local.load_model(bytearray(booster.save_raw("json")))
    local.set_params(n_jobs=model.n_jobs, device="cpu")
    model.booster_, model.classes_, model.device_ = local, encoder.classes_, used
    return model


def fit_run_model_on_dask(dataset, spec: RunSpec, config: CVConfig, client,
                          *, n_partitions: int | None = None) -> FittedModel:
    """:func:`classifiers.evaluation.cross_validation.fit_run_model` on all rows, trained on a dask cluster.

    Same classifier parameters (from ``config``) and feature blocks (one per fusion block).

    Raises
    ------
    ValueError
        For a classifier other than XGBoost (the logistic regression is quick locally).
    """
    if spec.classifier != "xgboost":
        raise ValueError(f"only xgboost trains on dask, not {spec.classifier!r}; train it without `dask`")
    template = make_classifier("xgboost", seed=config.seed, n_jobs=config.n_jobs, device=config.device)
    # Probe once for all blocks, not once per block.
    template.set_params(device=resolve_dask_device(client, config.device).device)
    blocks = [spec.stores] if spec.fusion in ("single", "concat") else [(s,) for s in spec.stores]
    estimators = [
        fit_xgboost_on_dask(client, _block_features(dataset.X, block), dataset.row_labels,
                            template, n_partitions=n_partitions)
        for block in blocks
    ]
    return FittedModel(spec, estimators, blocks, dataset.classes)


def _block_features(Xs, block) -> np.ndarray:
    return Xs[block[0]] if len(block) == 1 else np.hstack([Xs[s] for s in block])
