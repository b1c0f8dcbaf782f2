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


@pytest.mark.parametrize("package", ["data", "features", "classifiers"])
def test_public_names_are_not_shadowed_by_submodules(package):
    """Importing every submodule (as any user code may) leaves each public name what __all__ says."""
    import importlib
    import pkgutil
    import types

    module = importlib.import_module(package)
    before = {name: getattr(module, name) for name in module.__all__}
    for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)
    after = {name: getattr(module, name) for name in module.__all__}
    assert after == before
    assert not [name for name, value in after.items() if isinstance(value, types.ModuleType)]
