"""Issue 13 item 9: every number traceable to the library versions that made it."""
from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from features.config import ExtractionConfig
from features.store import FeatureStore, make_record
from conftest import extracted_table



def test_config_records_versions_outside_the_hash():
    from dataclasses import replace

    config = ExtractionConfig(weights="none")
    assert config.versions["numpy"] == np.__version__
    assert {"tensorflow", "keras", "numpy", "opencv", "staintools"} <= set(config.versions)
    other = replace(config, versions={**config.versions, "numpy": "0.0"})
    assert other.config_hash == config.config_hash
    old_record = {k: v for k, v in config.to_dict().items() if k != "versions"}
    assert ExtractionConfig.from_dict(old_record).versions == {}  # unknown, not this machine's


def test_store_config_json_records_versions(tmp_path):
    store = FeatureStore(tmp_path, ExtractionConfig(weights="none")).open()
    store.close()
    record = json.loads((store.path / "config.json").read_text())
    assert record["versions"]["keras"] == ExtractionConfig(weights="none").versions["keras"]


def test_model_json_records_versions_and_predict_warns_on_differences(tmp_path, caplog):
    from classifiers.evaluation.cv_dataset import build_dataset
    from classifiers.feature.model_io import TrainConfig, load_model, save_model, train_model
    from classifiers.feature.predict import reproducible_configs

    model = train_model(build_dataset([extracted_table()], "bach4"), TrainConfig(classifier="logreg"))
    out = save_model(model, tmp_path / "m")
    record = json.loads((out / "model.json").read_text())
    assert record["versions"]["scikit-learn"] and record["versions"]["xgboost"]
    assert record["stores"][0]["config"]["versions"]["tensorflow"]

    with caplog.at_level(logging.WARNING):
        reproducible_configs(load_model(out))
    assert "other versions" not in caplog.text  # same machine: nothing to say
    record["versions"]["scikit-learn"] = "0.1"
    record["stores"][0]["config"]["versions"]["numpy"] = "0.0"
    (out / "model.json").write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reproducible_configs(load_model(out))
    assert f"numpy 0.0 -> {np.__version__}" in caplog.text
    assert "scikit-learn 0.1 -> " in caplog.text


def test_cv_report_metrics_record_versions():
    from classifiers.evaluation.cv_dataset import build_dataset
    from classifiers.evaluation.cross_validation import CVConfig, run_cross_validation
    from classifiers.evaluation.report import summarize

    result = run_cross_validation(build_dataset([extracted_table()], "bach4"),
                                  CVConfig(n_folds=3, classifiers=("logreg",)))
    summary = summarize(result)
    assert summary["versions"]["xgboost"] and summary["versions"]["numpy"] == np.__version__
    assert summary["stores"][0]["versions"]["numpy"] == np.__version__


def _requirements():
    import configparser
    from pathlib import Path

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    parse = lambda text: {r.name.lower(): r for r in map(Requirement, filter(None, text.split("\n")))}
    return parse(cfg["options"]["install_requires"]), parse(cfg["options.extras_require"]["test"])


def test_dependencies_install_one_cv2_and_no_test_only_package():
    install, test = _requirements()
    # staintools requires opencv-python; a second distribution of cv2/ (headless) would share files
    assert "opencv-python" in install and "opencv-python-headless" not in install
    assert "scikit-image" not in install and "scikit-image" in test
    assert "filelock" in install


def test_keras_floor_excludes_safe_mode_bypasses():
    from packaging.version import Version

    install, _ = _requirements()
    # CVE-2025-1550 (fixed in 3.9), CVE-2025-8747 and CVE-2025-9906 (fixed in 3.11)
    assert not install["keras"].specifier.contains(Version("3.10.0"))
    assert install["keras"].specifier.contains(Version("3.11.0"))
