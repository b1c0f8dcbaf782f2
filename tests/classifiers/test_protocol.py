"""classifiers.protocol: load_model dispatches on what a model directory records."""
import json

import pytest

from classifiers.protocol import MODEL_KINDS, load_model, model_kind


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_each_kind_is_read_from_the_field_its_format_has_always_written(kind, tmp_path):
    entry = MODEL_KINDS[kind]
    (tmp_path / entry.record_file).write_text(json.dumps({entry.field: entry.value}))
    assert model_kind(tmp_path) == kind
    assert entry.model_class().kind == kind


def test_directories_that_are_no_model_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "config.json").write_text(json.dumps({"model": "something else"}))
    with pytest.raises(ValueError, match="is not a model directory of this package"):
        load_model(tmp_path)


def test_a_damaged_model_json_is_left_to_the_feature_loader_to_explain(tmp_path):
    (tmp_path / "model.json").write_text("{not json")
    assert model_kind(tmp_path) == "features"
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path)
