"""Label schemes as data: the classes a model predicts and how source labels map into them.

A :class:`LabelScheme` is one of

* a built-in scheme (:data:`data.labels.SCHEMES`: BACH's ``bach4``, ``bmc3``, ``binary``;
  BreakHis's ``breakhis8``, ``breakhis2``),
* ``classes``: the classes as found in the data, in :func:`data.labels.class_order`, or
* a mapping file (JSON) that merges fine classes into coarse ones::

      {"benign": ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"],
       "malignant": ["ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"]}

  Each key is a coarse class, in the order of the file; its value lists the labels merged into
  it (a single string is one label).  Labels are matched ignoring case, spaces and punctuation
  (:func:`data.labels.loose_key`: ``Grade 1`` matches ``grade1``); a coarse class name also
  maps to itself.  A label listed under two classes,
  a class given twice, or (for a data set) a label the file does not map is an error naming
  the file.

:func:`resolve_scheme` turns what a user gives as ``--labels`` into a scheme for the labels of
a data set; :func:`groupings` lists the coarser schemes a scheme's classes map into, for the
report-time regrouping of predictions (a bach4 run also reports bmc3 and binary).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import labels as label_api

__all__ = ["AUTO", "CLASSES", "LabelScheme", "MappingError", "builtin_scheme", "groupings", "load_mapping",
           "resolve_scheme"]

#: ``--labels`` value for the default: a built-in scheme when the labels are BACH's or BreakHis's
#: (bach4 for BACH's four classes, breakhis2 for BreakHis's subtypes), else the classes as found.
AUTO = "auto"
#: ``--labels`` value for the classes as found, in :func:`data.labels.class_order`.
CLASSES = "classes"


class MappingError(ValueError):
    """A mapping file is malformed or does not fit the labels; the message names the file."""


@dataclass(frozen=True)
class LabelScheme:
    """Classes in order, and the source labels each one takes.

    Attributes
    ----------
    name : str
        ``bach4`` ... for built-ins, ``classes``, or the mapping file's stem.
    classes : tuple of str
        Class names in class-index order.
    mapping : dict of str to str
        Source label -> class, besides each class mapping to itself.
    source : str
        ``built-in``, ``as found``, or the mapping file's path.
    """

    name: str
    classes: tuple[str, ...]
    mapping: Mapping[str, str] = field(default_factory=dict)
    source: str = "built-in"

    @property
    def builtin(self) -> bool:
        return self.source == "built-in"

    def accepts(self, labels: Iterable[str]) -> list[str]:
        """The distinct labels of `labels` this scheme cannot map (empty when all map)."""
        distinct = sorted({label_api.normalise_label(str(v)) for v in labels})
        if self.builtin:  # strict: a whole data set's labels (bmc3 'benign' is not bach4's)
            if not distinct:
                return []
            try:
                label_api.map_labels(distinct, self.name)
                return []
            except ValueError:
                known = set(label_api.scheme_mapping(self.name))
                return [v for v in distinct if v not in known] or distinct
        table = self._loose()
        return [v for v in distinct if label_api.loose_key(v) not in table]

    def _loose(self) -> dict[str, str]:
        table = {label_api.loose_key(c): c for c in self.classes}
        table.update({label_api.loose_key(k): v for k, v in self.mapping.items()})
        return table

    def map(self, labels: Iterable[str]) -> np.ndarray:
        """Map source labels into this scheme's classes (a string array).

        Raises
        ------
        ValueError
            Naming the labels the scheme does not map.
        """
        values = [label_api.normalise_label(str(v)) for v in labels]
        if self.builtin and not set(values) <= set(self.classes):
            return np.asarray(label_api.map_labels(values, self.name), dtype=str)
        missing = self.accepts(values)
        if missing:
            raise ValueError(f"{self.describe()} does not map label(s) {', '.join(map(repr, missing))}; "
                             f"it maps {', '.join(map(repr, sorted(set(self.mapping) | set(self.classes))))}")
        table = self._loose()
        return np.array([table[label_api.loose_key(v)] for v in values], dtype=str).reshape(len(values))

    def describe(self) -> str:
        if self.builtin:
            return f"label scheme {self.name!r}"
        if self.source == "as found":
            return "the classes as found"
        return f"mapping file '{self.source}'"

    def to_dict(self) -> dict:
        """JSON-ready record (model directories, reports)."""
        return {"name": self.name, "classes": list(self.classes), "mapping": dict(sorted(self.mapping.items())),
                "source": self.source}

    @classmethod
    def from_dict(cls, record: Mapping) -> "LabelScheme":
        """Inverse of :meth:`to_dict`; a built-in name alone is enough."""
        if isinstance(record, str):
            return builtin_scheme(record)
        if record.get("source", "built-in") == "built-in":
            return builtin_scheme(record["name"])
        return cls(str(record["name"]), tuple(map(str, record["classes"])),
                   {str(k): str(v) for k, v in dict(record.get("mapping", {})).items()}, str(record["source"]))


def builtin_scheme(name: str) -> LabelScheme:
    """The built-in scheme `name` (a key of :data:`data.labels.SCHEMES`)."""
    classes = label_api.class_names(name)  # raises for unknown names
    mapping = {k: v for k, v in label_api.scheme_mapping(name).items() if k != v}
    return LabelScheme(name, tuple(classes), mapping, "built-in")


def _reject_duplicate_keys(path: Path):
    def hook(pairs):
        seen = Counter(k for k, _ in pairs)
        twice = [k for k, n in seen.items() if n > 1]
        if twice:
            raise MappingError(f"mapping file '{path}': class(es) {', '.join(map(repr, twice))} given twice")
        return dict(pairs)
    return hook


def load_mapping(path: str | os.PathLike) -> LabelScheme:
    """Read a mapping file (see the module docstring).

    Raises
    ------
    MappingError
        If the file is missing, not JSON, not an object of class -> label list, lists a label
        under two classes, or gives a class twice; the message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError(f"mapping file '{path}' cannot be read: {exc.strerror or exc}") from None
    try:
        record = json.loads(text, object_pairs_hook=_reject_duplicate_keys(path))
    except json.JSONDecodeError as exc:
        raise MappingError(f"mapping file '{path}' is not valid JSON: {exc}") from None
    example = '{"benign": ["adenosis", "fibroadenoma"], "malignant": ["ductal_carcinoma"]}'
    if not isinstance(record, dict) or len(record) < 2:
        raise MappingError(f"mapping file '{path}' must be a JSON object of at least two classes, each with "
                           f"the labels it merges, e.g. {example}")
    classes, mapping, where = [], {}, {}
    for raw_class, members in record.items():
        try:
            cls = label_api.normalise_label(raw_class)
        except ValueError:
            raise MappingError(f"mapping file '{path}': a class name is empty") from None
        if cls in classes:
            raise MappingError(f"mapping file '{path}': class {cls!r} given twice (as {raw_class!r})")
        members = [members] if isinstance(members, str) else members
        if not isinstance(members, list) or not all(isinstance(m, str) and m.strip() for m in members):
            raise MappingError(f"mapping file '{path}': class {raw_class!r} must list its labels as a list of "
                               f"non-empty strings, e.g. {example}")
        classes.append(cls)
        for member in members:
            label = label_api.normalise_label(member)
            label = next((k for k in where if label_api.loose_key(k) == label_api.loose_key(label)), label)
            if label in where and where[label] != cls:
                raise MappingError(f"mapping file '{path}': label {member!r} is mapped twice, to {where[label]!r} "
                                   f"and to {cls!r}")
            where[label] = cls
            if label != cls:
                mapping[label] = cls
    for cls in classes:  # a class listed as a label of another class
        if cls in mapping and mapping[cls] != cls:
            raise MappingError(f"mapping file '{path}': {cls!r} is a class and also mapped to {mapping[cls]!r}")
    return LabelScheme(path.stem, tuple(classes), mapping, str(path))


def _is_mapping_file(spec: str) -> bool:
    return spec.lower().endswith(".json") or os.sep in spec or "/" in spec


def resolve_scheme(spec: "str | LabelScheme | None", labels: Iterable[str], *, where: str = "the data") -> LabelScheme:
    """The scheme ``--labels spec`` means for a data set with these labels.

    Parameters
    ----------
    spec : str, LabelScheme or None
        ``auto`` (or None), ``classes``, a built-in scheme name, or a mapping file path (``.json``).
    labels : iterable of str
        The data set's labels (as stored).
    where : str
        Names the data in error messages.

    Returns
    -------
    LabelScheme
        ``auto`` resolves to the first built-in scheme the labels map into (bach4, bmc3, binary,
        breakhis2 - so BreakHis subtypes are read as benign / malignant, the task of Spanhol et
        al.), else to the classes as found.

    Raises
    ------
    MappingError
        For a bad mapping file, or labels it does not map (the labels are listed with counts).
    ValueError
        For an unknown scheme name, or labels a built-in scheme cannot map.
    """
    counts = Counter(label_api.normalise_label(str(v)) for v in labels)
    if isinstance(spec, LabelScheme):
        scheme = spec
    elif spec in (None, AUTO):
        supported = label_api.supported_schemes(counts) if counts and all(
            c in label_api.CANONICAL_LABELS for c in counts) else ()
        if supported:
            return builtin_scheme(supported[0])
        return LabelScheme(CLASSES, label_api.class_order(counts), {}, "as found")
    elif spec == CLASSES:
        return LabelScheme(CLASSES, label_api.class_order(counts), {}, "as found")
    elif spec in label_api.SCHEMES:
        scheme = builtin_scheme(spec)
    elif _is_mapping_file(str(spec)):
        scheme = load_mapping(spec)
    else:
        raise ValueError(f"unknown label scheme {spec!r}: use auto, classes, one of {', '.join(label_api.SCHEMES)}, "
                         "or a mapping file (.json)")
    missing = scheme.accepts(counts)
    if scheme.builtin:
        missing = [c for c in counts if c not in label_api.CANONICAL_LABELS]
        if not missing and counts:
            label_api.map_labels(list(counts), scheme.name)  # its message explains e.g. bmc3's 'benign'

    if missing:
        shown = ", ".join(f"{m!r} ({counts[m]} images)" for m in missing)
        error = MappingError if not scheme.builtin else ValueError
        raise error(f"{scheme.describe()} leaves label(s) of {where} unmapped: {shown}; "
                    f"labels found: {', '.join(f'{k} ({n})' for k, n in sorted(counts.items()))}")
    return scheme


def groupings(scheme: LabelScheme, extra: Iterable[LabelScheme] = ()) -> list[LabelScheme]:
    """Coarser schemes `scheme`'s classes map into, for report-time regrouping.

    The built-in schemes that map every class of `scheme` into fewer classes (bach4 -> bmc3,
    binary; breakhis8 -> breakhis2), then each of `extra` (mapping files) that does.
    """
    found = []
    candidates = [builtin_scheme(n) for n in label_api.SCHEMES] + list(extra)
    for other in candidates:
        if other.classes == scheme.classes or other.accepts(scheme.classes):
            continue
        if len(other.classes) >= len(scheme.classes) or any(o.classes == other.classes for o in found):
            continue
        if scheme.builtin and other.builtin and other.name not in label_api.supported_schemes(
                scheme.classes, source_scheme=scheme.name):
            continue
        found.append(other)
    return found
