from dataclasses import replace

import pytest

from features.config import ExtractionConfig


def test_hash_ignores_descriptive_fields_and_tracks_real_ones():
    base = ExtractionConfig(weights_sha256="ab" * 32)
    assert replace(base, weights="/elsewhere/file.pth").config_hash == base.config_hash
    assert replace(base, package_version="9.9").config_hash == base.config_hash
    for change in ({"seed": 1}, {"crops": 19}, {"scale": 0.25}, {"weights_sha256": "cd" * 32},
                   {"mode": "shared"}, {"precision": "bfloat16"}, {"color_gain": 0.2}):
        assert replace(base, **change).config_hash != base.config_hash, change


def test_fields_added_later_keep_old_stores_keys():
    record = ExtractionConfig().to_dict()
    old = {k: v for k, v in record.items() if k not in ("mode", "precision")}
    assert ExtractionConfig.from_dict(old).config_hash == ExtractionConfig().config_hash


def test_invalid_and_unknown_fields_are_clear_errors():
    with pytest.raises(ValueError, match="pooling must be one of"):
        ExtractionConfig(pooling="median")
    with pytest.raises(ValueError, match="another version"):
        ExtractionConfig.from_dict({**ExtractionConfig().to_dict(), "new_knob": 1})
