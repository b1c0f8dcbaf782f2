"""The layering of docs/architecture.md, checked on the source: data <- features <- classifiers <- pipeline."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("data", "features", "classifiers", "pipeline")  # each may import only those before it


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path, package: str | None = None) -> list[tuple[str, tuple[str, ...], int]]:
    """``(module, imported names, line)`` of every import, at any depth (late imports too);
    a relative import counts as one of `package` (default: the file's top-level folder)."""
    package = package or path.parent.relative_to(ROOT).parts[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, tuple(a.name for a in node.names), node.lineno))
        elif isinstance(node, ast.ImportFrom):  # relative: inside the same package
            found.append((package, tuple(a.name for a in node.names), node.lineno))
    return found


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_imports_point_down_the_layers(layer):
    higher = set(LAYERS[LAYERS.index(layer) + 1:])
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in _modules(layer) for module, _, line in _imports(path)
             if module.split(".")[0] in higher]
    assert wrong == []


def test_no_module_imports_a_private_name_of_another():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name} from {module}"
             for layer in LAYERS for path in _modules(layer) for module, names, line in _imports(path)
             if module.split(".")[0] in LAYERS for name in names
             if name.startswith("_") and not name.startswith("__")]
    assert wrong == []


def test_the_checker_finds_late_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from classifiers.heatmap import _x\nfrom .io import read_image\nimport pipeline.train\n")
    assert sorted((m, n) for m, n, _ in _imports(source, "data")) == [
        ("classifiers.heatmap", ("_x",)), ("data", ("read_image",)), ("pipeline.train", ())]


def test_no_cli_defines_a_class():
    """pipeline/ modules parse, call the library and print: models, adapters and configs live below.

    The one exception is argparse's own extension point: a help formatter subclass in the
    shared-options module (argparse takes a formatter class, not a function)."""
    allowed = {("pipeline/_common.py", "HelpFormatter")}
    found = [f"{path.relative_to(ROOT)}:{node.lineno} class {node.name}" for path in _modules("pipeline")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.ClassDef) and (path.relative_to(ROOT).as_posix(), node.name) not in allowed]
    assert found == []
