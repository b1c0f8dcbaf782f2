"""Extraction and XGBoost on a dask LocalCluster of two single-threaded worker processes.

One cluster serves the whole module (starting a worker and importing TensorFlow in it is the
main cost).  Everything listens on 127.0.0.1 only.  The worker-kill tests restart a worker,
so they run last.
"""
import json
import os
import signal

# One passive OpenMP runtime for the shared cores (see pipeline/cv_report.py); before xgboost
# loads, and inherited by the worker processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")
from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402

from classifiers.feature.dask_xgboost import fit_xgboost_on_dask, scatter_partitions  # noqa: E402
from classifiers.evaluation.cv_dataset import build_dataset  # noqa: E402
from classifiers.feature.model_io import TrainConfig, load_model, load_xgboost, save_xgboost, train_model  # noqa: E402
from classifiers.feature.estimators import XGBoostFeatureClassifier  # noqa: E402
from classifiers.evaluation.voting import vote  # noqa: E402
from features.distributed import DaskConnectionError, dask_client, extract_on_dask, parse_dask_spec  # noqa: E402
from features.extract import extract_to_store, make_config  # noqa: E402
from features.store import load_store  # noqa: E402
from pipeline import extract as extract_cli  # noqa: E402
from pipeline import train as train_cli  # noqa: E402
from conftest import TINY_PROTOCOL

BATCH = 3  # crops per forward pass: 4 crops per image, so the last batch is padded
SMALL = {**TINY_PROTOCOL, "batch_size": BATCH}  # the batch size is part of the store key


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def config(tiny_dataset):
    return make_config(tiny_dataset, backbone="efficientnet_lite0", weights=None, **SMALL)


@pytest.fixture(scope="module")
def single_store(tiny_dataset, config, tmp_path_factory):
    """The reference: the single-process run."""
    root = tmp_path_factory.mktemp("single")
    extract_to_store(tiny_dataset, config, root, batch_size=BATCH, progress=False)
    return root


@pytest.fixture(scope="module")
def dask_store(client, tiny_dataset, config, tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    summary = extract_on_dask(tiny_dataset, config, root, client, batch_size=BATCH, progress=False)
    return root, summary


def assert_same_store(root, reference):
    got, want = load_store(root), load_store(reference)
    np.testing.assert_array_equal(got.X, want.X)  # bit for bit
    pd.testing.assert_frame_equal(got.meta, want.meta)
    assert got.config == want.config


def test_dask_store_equals_single_process_store(dask_store, single_store, tiny_dataset):
    root, summary = dask_store
    assert summary.done == list(tiny_dataset.image_id)  # dataset order, as single-process
    assert summary.cached == [] and summary.skipped == [] and summary.crops == 8 * 2 * 2
    assert summary.device.startswith("2 dask worker(s), CPU")  # both workers extracted images
    assert_same_store(root, single_store)
    assert json.loads((summary.store_path / "skipped.json").read_text()) == []


def test_dask_rerun_does_no_work(client, dask_store, tiny_dataset, config):
    root, _ = dask_store
    again = extract_on_dask(tiny_dataset, config, root, client, batch_size=BATCH, progress=False)
    assert again.done == [] and len(again.cached) == 8 and again.crops == 0


def test_unreadable_image_is_skipped_on_dask(client, tiny_dir, config, tmp_path):
    import shutil

    from data.datasets import load_dataset

    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    (data / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    summary = extract_on_dask(load_dataset(data), config, tmp_path / "store", client, batch_size=BATCH,
                              progress=False)
    assert len(summary.done) == 8
    assert [s["image_id"] for s in summary.skipped] == ["benign/broken.png"]
    skipped = json.loads((summary.store_path / "skipped.json").read_text())
    assert skipped[0]["image_id"] == "benign/broken.png" and skipped[0]["reason"]


def test_extract_cli_with_scheduler_address(client, tiny_dir, single_store, tmp_path, capsys):
    args = ["--data", str(tiny_dir), "--out", str(tmp_path), "--weights", "none", "--augmentations", "2",
            "--crops", "2", "--crop-size", "48", "--scale", "1", "--batch-size", str(BATCH), "--quiet",
            "--dask", client.scheduler.address]
    assert extract_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "images extracted now: 8, already in the store: 0, skipped: 0" in out
    assert "on 2 dask worker(s), CPU" in out
    assert_same_store(tmp_path, single_store)


def test_dask_spec_parsing_and_unreachable_scheduler():
    assert parse_dask_spec("local:2") == ("local", 2)
    assert parse_dask_spec("tcp://127.0.0.1:8786") == ("address", "tcp://127.0.0.1:8786")
    for bad in ("local:0", "local:two", " "):
        with pytest.raises(ValueError, match="local:N|scheduler address"):
            parse_dask_spec(bad)
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(DaskConnectionError, match="tcp://127.0.0.1:9"):
            with dask_client("tcp://127.0.0.1:9"):  # the discard port: nothing listens
                pass


def four_class_features(n=800, seed=0):
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n, n_features=40, n_informative=12, n_classes=4,
                               n_clusters_per_class=1, random_state=seed)
    return X.astype(np.float32), np.array(["normal", "benign", "insitu", "invasive"])[y]


def test_xgboost_on_dask_is_as_accurate_as_single_process(client, tmp_path):
    X, y = four_class_features()
    train, test = slice(0, 600), slice(600, None)
    params = XGBoostFeatureClassifier(n_jobs=1, device="cpu")
    local = XGBoostFeatureClassifier(n_jobs=1, device="cpu").fit(X[train], y[train])
    on_dask = fit_xgboost_on_dask(client, X[train], y[train], params)
    local_acc = float((local.predict(X[test]) == y[test]).mean())
    dask_acc = float((on_dask.predict(X[test]) == y[test]).mean())
    assert local_acc == pytest.approx(0.855, abs=0.03)  # chance is 0.25
    assert abs(dask_acc - local_acc) <= 0.03, (dask_acc, local_acc)
    assert on_dask.get_params() == params.get_params()  # the same defaults
    assert list(on_dask.classes_) == ["benign", "insitu", "invasive", "normal"]
    assert on_dask.device_ == "cpu"
    # saved as XGBoost JSON and read back by model_io: the same predictions
    save_xgboost(on_dask, tmp_path / "estimator-0.json")
    loaded = load_xgboost(tmp_path / "estimator-0.json", list(on_dask.classes_), on_dask.get_params(), 40)
    np.testing.assert_array_equal(loaded.predict_proba(X[test]), on_dask.predict_proba(X[test]))
    # one partition per worker, each on its own worker
    _, _, futures = scatter_partitions(client, X[train], np.zeros(600, np.int32))
    holders = client.who_has(futures)
    assert len({w for f in futures for w in holders[f.key]}) == 2
    client.cancel(futures)


def test_train_cli_on_dask(client, dask_store, tmp_path, capsys):
    root, summary = dask_store
    out = tmp_path / "model"
    args = ["--features", str(summary.store_path), "--out", str(out), "--n-jobs", "1", "--device", "cpu",
            "--dask", client.scheduler.address]
    assert train_cli.main(args) == 0
    assert "on 2 dask workers" in capsys.readouterr().out
    model = load_model(out)
    assert model.classifier == "xgboost" and model.training["dask_workers"] == 2
    dataset = build_dataset([load_store(summary.store_path)], "bach4")
    local = train_model(dataset, TrainConfig(classifier="xgboost", n_jobs=1, device="cpu"))
    assert model.params == local.params
    dask_votes = vote(dataset.row_image, model.fitted.predict_proba(dataset.X)).majority
    local_votes = vote(dataset.row_image, local.fitted.predict_proba(dataset.X)).majority
    truth = dataset.images["label"].map({c: i for i, c in enumerate(dataset.classes)}).to_numpy()
    assert (dask_votes == truth).mean() == (local_votes == truth).mean() == 1.0  # 8 training images

    assert train_cli.main(args[:-2] + ["--classifier", "logreg", "--dask", client.scheduler.address]) == 2
    assert "--dask trains xgboost only" in capsys.readouterr().err


class KillOnSecondTask(WorkerPlugin):
    """SIGKILLs the first worker process that starts its second extraction task, once."""

    name = "kill-on-second-task"

    def __init__(self, marker: str):
        self.marker = marker
        self.started = 0

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or not str(key).startswith("extract-image-"):
            return
        self.started += 1
        if self.started != 2:
            return
        try:  # O_EXCL: one kill in all, whichever worker (or restarted worker) gets here first
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def test_worker_killed_mid_run_loses_no_finished_image(client, tiny_dataset, config, single_store, tmp_path):
    marker = tmp_path / "killed-pid"
    pids_before = set(client.run(os.getpid).values())
    client.register_plugin(KillOnSecondTask(str(marker)))
    try:
        summary = extract_on_dask(tiny_dataset, config, tmp_path / "store", client, batch_size=BATCH,
                                  progress=False)
    finally:
        client.unregister_worker_plugin(KillOnSecondTask.name)
    killed = int(marker.read_text())
    assert killed in pids_before  # a worker really died, after finishing its first image
    assert len(summary.done) == 8 and summary.skipped == []
    assert_same_store(tmp_path / "store", single_store)
    client.wait_for_workers(2, timeout=120)  # the nanny restarted it
    assert killed not in set(client.run(os.getpid).values())


def _set_allowed_failures(value, dask_scheduler=None):
    previous, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, value
    return previous


def test_image_that_keeps_killing_workers_is_skipped_and_a_rerun_completes(
        client, tiny_dataset, config, single_store, tmp_path):
    store = tmp_path / "store"
    previous = client.run_on_scheduler(_set_allowed_failures, 0)  # the first death is one too many
    client.register_plugin(KillOnSecondTask(str(tmp_path / "killed-pid")))
    try:
        summary = extract_on_dask(tiny_dataset, config, store, client, batch_size=BATCH, progress=False)
    finally:
        client.unregister_worker_plugin(KillOnSecondTask.name)
        client.run_on_scheduler(_set_allowed_failures, previous)
    # the dead worker's task(s): reported, not fatal; every other image finished
    assert 1 <= len(summary.skipped) <= 2 and len(summary.done) + len(summary.skipped) == 8
    assert "1 dask worker(s) died while extracting this image" in summary.skipped[0]["reason"]
    stored, reference = load_store(store), load_store(single_store)
    kept = reference.meta.image_id.isin(summary.done).to_numpy()
    np.testing.assert_array_equal(stored.X, reference.X[kept])
    # The rerun finishes the store; single-process here (a dask rerun works the same, but would
    # wait for the restarted worker to import TensorFlow): both kinds of run share one store.
    again = extract_to_store(tiny_dataset, config, store, batch_size=BATCH, progress=False)
    assert again.done == [s["image_id"] for s in summary.skipped] and len(again.cached) == len(summary.done)
    assert again.skipped == []
    assert_same_store(store, single_store)
