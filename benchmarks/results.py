"""Where the benchmarks write their JSON results: one atomic write (``data.files``)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, results) -> None:
    """Write `results` to `path` as indented JSON, whole or not at all (a run killed while
    writing must not leave a truncated result beside the finished ones)."""
    from data.files import atomic_write_text  # the project root is on sys.path when a benchmark runs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=str))
