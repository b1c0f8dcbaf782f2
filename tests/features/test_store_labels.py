"""Issue 12: stores keep any class names, patient groups and the magnification; old stores load."""
from __future__ import annotations

import joblib
import numpy as np

from features.config import ExtractionConfig
from features.store import FeatureStore, load_store, make_record


def _config() -> ExtractionConfig:
    return ExtractionConfig(weights="none", augmentations=2, crops=1, crop_size=32)


def test_store_records_any_labels_groups_and_magnification(tmp_path):
    store = FeatureStore(tmp_path, _config()).open()
    rows = [("SOB_B_A-14-22549AB-40-001.png", "adenosis", "14-22549", "40"),
            ("SOB_M_DC-14-2523-100-010.png", "ductal_carcinoma", "14-2523", "100"),
            ("g/x.png", "grade3", "p7", "")]
    for i, (image_id, label, group, mag) in enumerate(rows):
        store.write(make_record(image_id=image_id, label=label, group=group, path=f"/d/{image_id}",
                                source_sha256=f"{i:064x}", features=np.full((2, 3), i, np.float32),
                                stain_note=None, magnification=mag))
    # A record written before the magnification was recorded.
    old = make_record(image_id="old.png", label="normal", group="old.png", path="/d/old.png",
                      source_sha256="f" * 64, features=np.zeros((2, 3), np.float32), stain_note=None)
    del old["magnification"]
    joblib.dump(old, store.record_path("old.png"))
    store.close()
    table = load_store(store.path)
    per_image = table.meta.drop_duplicates("image_id").set_index("image_id")
    assert per_image["label"].to_dict() == {"SOB_B_A-14-22549AB-40-001.png": "adenosis", "SOB_M_DC-14-2523-100-010.png":
                                            "ductal_carcinoma", "g/x.png": "grade3", "old.png": "normal"}
    assert per_image["magnification"].to_dict() == {"SOB_B_A-14-22549AB-40-001.png": "40",
                                                    "SOB_M_DC-14-2523-100-010.png": "100", "g/x.png": "", "old.png": ""}
    assert per_image.loc["old.png", "source_sha256"] == "f" * 64
    assert len(table.meta) == 8 and table.X.shape == (8, 3)
    # A rerun refreshes the magnification of a finished record without touching its features.
    store = FeatureStore(tmp_path, _config()).open()
    store.update_meta("old.png", "normal", "old.png", "/d/old.png", "200")
    store.close()
    assert store.read("old.png")["magnification"] == "200"
    np.testing.assert_array_equal(store.read("old.png")["features"], np.zeros((2, 3)))
