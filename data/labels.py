"""Class labels and labelling schemes.

Source labels are first normalised to one of the canonical labels
:data:`CANONICAL_LABELS` by :func:`canonical_label`, then mapped into a
labelling *scheme* by :func:`map_labels`:

==============  =========  ==========  ==============
source label    ``bach4``  ``bmc3``    ``binary``
==============  =========  ==========  ==============
normal          normal     benign      non-carcinoma
benign          benign     benign      non-carcinoma
insitu          insitu     insitu      carcinoma
invasive        invasive   invasive    carcinoma
non-carcinoma   --         --          non-carcinoma
carcinoma       --         --          carcinoma
==============  =========  ==========  ==============

Mapping only goes from finer to coarser schemes. ``benign`` is ambiguous:
in ``bach4`` it excludes normal tissue, in ``bmc3`` it includes it. Labels
containing ``benign`` but no ``normal`` are therefore taken to be ``bmc3``
labels (which cannot be mapped to ``bach4``) unless the caller states
``source_scheme="bach4"``. Map the labels of a whole dataset once, before
splitting it, so that a subset that happens to lack ``normal`` images is not
mistaken for ``bmc3``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

__all__ = [
    "CANONICAL_LABELS",
    "SCHEMES",
    "canonical_label",
    "class_names",
    "decode",
    "encode",
    "map_labels",
    "supported_schemes",
]

#: Class names of each scheme, in class-index order.
SCHEMES: dict[str, tuple[str, ...]] = {
    "bach4": ("normal", "benign", "insitu", "invasive"),
    "bmc3": ("benign", "insitu", "invasive"),
    "binary": ("non-carcinoma", "carcinoma"),
}

#: Every label :func:`canonical_label` can return.
CANONICAL_LABELS: tuple[str, ...] = ("normal", "benign", "insitu", "invasive", "non-carcinoma", "carcinoma")

# Normalised spelling (lower case, no spaces/underscores/hyphens) -> canonical.
_ALIASES: dict[str, str] = {
    "normal": "normal",
    "benign": "benign",
    "insitu": "insitu",
    "insitucarcinoma": "insitu",
    "carcinomainsitu": "insitu",
    "invasive": "invasive",
    "invasivecarcinoma": "invasive",
    "noncarcinoma": "non-carcinoma",
    "carcinoma": "carcinoma",
}

# Target scheme -> {canonical source label: class}; absent = not mappable.
_MAPPING: dict[str, dict[str, str]] = {
    "bach4": {"normal": "normal", "benign": "benign", "insitu": "insitu", "invasive": "invasive"},
    "bmc3": {"normal": "benign", "benign": "benign", "insitu": "insitu", "invasive": "invasive"},
    "binary": {
        "normal": "non-carcinoma",
        "benign": "non-carcinoma",
        "insitu": "carcinoma",
        "invasive": "carcinoma",
        "non-carcinoma": "non-carcinoma",
        "carcinoma": "carcinoma",
    },
}

_SEPARATORS = re.compile(r"[\s_\-]+")


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def class_names(scheme: str) -> tuple[str, ...]:
    """Return the class names of `scheme` in class-index order.

    Parameters
    ----------
    scheme : {'bach4', 'bmc3', 'binary'}

    Returns
    -------
    tuple of str

    Raises
    ------
    ValueError
        If `scheme` is unknown.
    """
    _check_scheme(scheme)
    return SCHEMES[scheme]


def canonical_label(raw: str) -> str:
    """Normalise a label spelling to one of :data:`CANONICAL_LABELS`.

    Case, surrounding whitespace and inner spaces, underscores and hyphens
    are ignored, so ``"InSitu"``, ``"in_situ"`` and ``"in situ"`` all give
    ``"insitu"``; ``"Non-Carcinoma"`` and ``"noncarcinoma"`` give
    ``"non-carcinoma"``.

    Parameters
    ----------
    raw : str
        Label as found in a folder name or manifest.

    Returns
    -------
    str
        Canonical label.

    Raises
    ------
    ValueError
        If `raw` is not a string or not a known label; the message lists the
        accepted labels.
    """
    if not isinstance(raw, str):
        raise ValueError(f"label must be a string, got {raw!r} ({type(raw).__name__})")
    key = _SEPARATORS.sub("", raw.strip().lower())
    try:
        return _ALIASES[key]
    except KeyError:
        raise ValueError(
            f"unknown label {raw!r}; accepted labels: {', '.join(CANONICAL_LABELS)} "
            "(case, spaces, '_' and '-' are ignored, e.g. 'InSitu' or 'in situ')"
        ) from None


def _canonical_unique(labels: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Canonicalise labels; return (unique canonical labels, inverse indices)."""
    values = np.asarray(list(labels), dtype=object)
    if values.size == 0:
        return np.array([], dtype=object), np.array([], dtype=np.intp)
    for value in values:
        if not isinstance(value, str):
            canonical_label(value)  # raises with a clear message
    # Work on the distinct spellings only: datasets repeat a handful of labels.
    spellings, inverse = np.unique(values.astype(str), return_inverse=True)
    canon = np.array([canonical_label(str(s)) for s in spellings], dtype=object)
    return canon, inverse


def supported_schemes(labels: Iterable[str], *, source_scheme: str | None = None) -> tuple[str, ...]:
    """Return the schemes that `labels` can be mapped into.

    Parameters
    ----------
    labels : iterable of str
        Source labels (any spelling accepted by :func:`canonical_label`).
    source_scheme : str, optional
        Scheme the labels are known to be in. When omitted it is inferred:
        ``non-carcinoma``/``carcinoma`` labels support only ``binary``, and
        ``benign`` without ``normal`` is read as ``bmc3`` benign, which does
        not support ``bach4``.

    Returns
    -------
    tuple of str
        Supported scheme names, in the order of :data:`SCHEMES`.

    Raises
    ------
    ValueError
        If a label is unknown, or not a class of `source_scheme`.
    """
    canon, _ = _canonical_unique(labels)
    present = set(canon)
    if source_scheme is not None:
        _check_scheme(source_scheme)
        foreign = sorted(present - set(SCHEMES[source_scheme]))
        if foreign:
            raise ValueError(
                f"labels {foreign} are not classes of source scheme {source_scheme!r} "
                f"({', '.join(SCHEMES[source_scheme])})"
            )
        reachable = {"bach4": ("bach4", "bmc3", "binary"), "bmc3": ("bmc3", "binary"), "binary": ("binary",)}
        return reachable[source_scheme]
    schemes = [s for s in SCHEMES if present <= set(_MAPPING[s])]
    if "benign" in present and "normal" not in present and "bach4" in schemes:
        schemes.remove("bach4")
    return tuple(schemes)


def map_labels(labels: Iterable[str], scheme: str, *, source_scheme: str | None = None) -> np.ndarray:
    """Map source labels into the classes of `scheme`.

    Parameters
    ----------
    labels : iterable of str
        Source labels in any spelling accepted by :func:`canonical_label`.
    scheme : {'bach4', 'bmc3', 'binary'}
        Target scheme.
    source_scheme : str, optional
        Scheme the labels are in; inferred when omitted (see
        :func:`supported_schemes`). Pass ``"bach4"`` to read ``benign``
        labels of a dataset without ``normal`` images as bach4 benign.

    Returns
    -------
    numpy.ndarray
        String array of class names of `scheme`, same length as `labels`.

    Raises
    ------
    ValueError
        If a label is unknown, or the labels cannot be mapped into `scheme`
        (the message lists the schemes they do support).

    Examples
    --------
    >>> map_labels(["Normal", "in situ", "Invasive"], "binary").tolist()
    ['non-carcinoma', 'carcinoma', 'carcinoma']
    """
    _check_scheme(scheme)
    canon, inverse = _canonical_unique(labels)
    if canon.size == 0:
        return np.array([], dtype=str)
    supported = supported_schemes(canon, source_scheme=source_scheme)
    if scheme not in supported:
        present = sorted(set(canon), key=CANONICAL_LABELS.index)
        why = ""
        if source_scheme is None and "benign" in present and "normal" not in present:
            why = (
                " ('benign' without any 'normal' is read as bmc3 benign, which includes normal"
                " tissue; pass source_scheme='bach4' if these are bach4 labels)"
            )
        raise ValueError(
            f"cannot map labels {present} to scheme {scheme!r}: they support only "
            f"{', '.join(repr(s) for s in supported) or 'no scheme'}{why}"
        )
    mapped = np.array([_MAPPING[scheme][c] for c in canon], dtype=str)
    return mapped[inverse]


def encode(labels: Iterable[str], scheme: str) -> np.ndarray:
    """Encode labels as class indices of `scheme` (order of :func:`class_names`).

    Labels that are all class names of `scheme` (in any accepted spelling)
    are encoded directly, so subsets of already-mapped labels always work;
    otherwise they are first mapped with :func:`map_labels`.

    Parameters
    ----------
    labels : iterable of str
        Labels to encode.
    scheme : {'bach4', 'bmc3', 'binary'}

    Returns
    -------
    numpy.ndarray
        ``int64`` class indices, same length as `labels`.

    Raises
    ------
    ValueError
        If a label is unknown or cannot be mapped into `scheme`.

    Examples
    --------
    >>> encode(["invasive", "normal"], "bach4").tolist()
    [3, 0]
    """
    names = class_names(scheme)
    labels = list(labels)
    canon, inverse = _canonical_unique(labels)
    if not set(canon) <= set(names):
        canon, inverse = _canonical_unique(map_labels(labels, scheme))
    codes = np.array([names.index(c) for c in canon], dtype=np.int64)
    return codes[inverse]


def decode(codes: Iterable[int], scheme: str) -> np.ndarray:
    """Turn class indices of `scheme` back into class names.

    Parameters
    ----------
    codes : iterable of int
        Class indices in ``range(len(class_names(scheme)))``.
    scheme : {'bach4', 'bmc3', 'binary'}

    Returns
    -------
    numpy.ndarray
        String array of class names.

    Raises
    ------
    ValueError
        If an index is out of range.
    """
    names = np.array(class_names(scheme), dtype=str)
    codes = np.asarray(list(codes), dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
        raise ValueError(f"class indices must be in 0..{len(names) - 1} for scheme {scheme!r}")
    return names[codes]
