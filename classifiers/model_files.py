"""Files every CNN model kind writes: Keras networks without optimizer state, then a JSON record.

One way to write and read such a directory (atomic writes, the record last so a directory with
a record is complete; ``safe_mode=True``: loading runs no code) for :mod:`classifiers.two_stage`
and :mod:`classifiers.patch_cnn`.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.files import atomic_write, atomic_write_text


def save_network(net, path):
    """Write ``net`` to ``path`` atomically as the same layers in an uncompiled model (no
    optimizer state); returns that model."""
    import keras

    bare = keras.Model(net.input, net.output, name=net.name)
    atomic_write(Path(path), bare.save)
    return bare


def load_network(path):
    """Read a network written by :func:`save_network` (``safe_mode=True``, not compiled)."""
    import keras

    return keras.models.load_model(path, safe_mode=True, compile=False)


def save_model_directory(directory, networks: dict, record_file: str, record: dict) -> Path:
    """Write ``networks`` (file name -> Keras model) then ``record`` plus ``keras_version`` as
    JSON in ``record_file``; returns the directory."""
    import keras

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for filename, net in networks.items():
        save_network(net, directory / filename)
    record = {**record, "keras_version": keras.__version__}
    atomic_write_text(directory / record_file, json.dumps(record, indent=2))
    return directory


def load_model_directory(directory, record_file: str, marks: dict, description: str,
                         networks: tuple = ()) -> tuple[dict, dict]:
    """``(record, {file name: network})`` of a directory written by :func:`save_model_directory`.

    Parameters
    ----------
    marks : dict
        Record fields that must hold these values (kind, format version).
    description : str
        What the directory is, for messages ("two-stage model").

    Raises
    ------
    FileNotFoundError
        No ``record_file``: not such a directory.
    ValueError
        A record without ``marks``: another kind or format version (the message says the
        format this version reads).
    """
    directory = Path(directory)
    path = directory / record_file
    if not path.is_file():
        raise FileNotFoundError(f"'{directory}' is not a {description} directory (no {record_file})")
    record = json.loads(path.read_text(encoding="utf-8"))
    if any(record.get(key) != value for key, value in marks.items()):
        raise ValueError(f"'{path}' is not a {description} of this package's format "
                         f"({', '.join(f'{k} {v!r}' for k, v in marks.items())}); retrain it with this version")
    return record, {filename: load_network(directory / filename) for filename in networks}
