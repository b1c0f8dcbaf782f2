"""Class labels and labelling schemes.

Any set of class names is valid (a lab's own ``grade1``/``grade2``, ``IDC``/``DCIS``...):
:func:`normalise_label` keeps a name as written (trimmed) unless it is a spelling of a known
name, :func:`class_order` puts classes in a stable documented order, and
:func:`check_class_names` catches names a user probably misspelt.  Groupings of classes are
:class:`data.mapping.LabelScheme` objects (built-in or read from a mapping file).

The built-in schemes of BACH and BreakHis: source labels are first normalised to one of the
known labels :data:`CANONICAL_LABELS` by :func:`canonical_label`, then mapped into a
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

BreakHis: ``breakhis8`` holds the eight tumour subtypes of :data:`BREAKHIS_SUBTYPES` (benign
adenosis, fibroadenoma, phyllodes_tumor, tubular_adenoma; malignant ductal_carcinoma,
lobular_carcinoma, mucinous_carcinoma, papillary_carcinoma), ``breakhis2`` is benign /
malignant (the subtypes, or ``benign`` / ``malignant`` themselves).

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
    "BREAKHIS_SUBTYPES",
    "CANONICAL_LABELS",
    "SCHEMES",
    "canonical_label",
    "check_class_names",
    "class_names",
    "class_order",
    "decode",
    "display_name",
    "encode",
    "map_labels",
    "loose_key",
    "normalise_label",
    "scheme_mapping",
    "supported_schemes",
]

#: BreakHis tumour subtypes: the code in the file names -> the class name (BreakHis's folder
#: name), benign (A, F, PT, TA) then malignant (DC, LC, MC, PC).
BREAKHIS_SUBTYPES: dict[str, str] = {
    "A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma", "PC": "papillary_carcinoma",
}
_BREAKHIS_BENIGN = ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma")

#: Class names of each scheme, in class-index order.
SCHEMES: dict[str, tuple[str, ...]] = {
    "bach4": ("normal", "benign", "insitu", "invasive"),
    "bmc3": ("benign", "insitu", "invasive"),
    "binary": ("non-carcinoma", "carcinoma"),
    "breakhis2": ("benign", "malignant"),
    "breakhis8": tuple(BREAKHIS_SUBTYPES.values()),
}

#: Every label :func:`canonical_label` can return, in their conventional order (BACH's from
#: normal to invasive, then BreakHis's): the order :func:`class_order` gives them.
CANONICAL_LABELS: tuple[str, ...] = (
    "normal", "benign", "insitu", "invasive", "non-carcinoma", "carcinoma", "malignant",
    *BREAKHIS_SUBTYPES.values(),
)

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
    "malignant": "malignant",
    **{name.replace("_", ""): name for name in BREAKHIS_SUBTYPES.values()},
    "phyllodestumour": "phyllodes_tumor",
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
    "breakhis2": {
        "benign": "benign", "malignant": "malignant",
        **{n: "benign" if n in _BREAKHIS_BENIGN else "malignant" for n in BREAKHIS_SUBTYPES.values()},
    },
    "breakhis8": {n: n for n in BREAKHIS_SUBTYPES.values()},
}

_SEPARATORS = re.compile(r"[\s_\-]+")


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def class_names(scheme: str) -> tuple[str, ...]:
    """Return the class names of `scheme` in class-index order.

    Parameters
    ----------
    scheme : str
        A name of :data:`SCHEMES`.

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


def scheme_mapping(scheme: str) -> dict[str, str]:
    """Every source label the built-in `scheme` maps, and the class it maps to."""
    _check_scheme(scheme)
    return dict(_MAPPING[scheme])


#: How a reader writes a class name (titles, legends, Methods); files keep the scheme's names.
DISPLAY_NAMES: dict[str, str] = {"insitu": "in situ"}


def display_name(text: str) -> str:
    """Class names in `text` as a reader writes them: ``"benign vs insitu"`` -> ``"benign vs in situ"``."""
    return re.sub(r"[A-Za-z-]+", lambda m: DISPLAY_NAMES.get(m.group(0), m.group(0)), str(text))


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
        reachable = {"bach4": ("bach4", "bmc3", "binary"), "bmc3": ("bmc3", "binary"), "binary": ("binary",),
                     "breakhis8": ("breakhis2", "breakhis8"), "breakhis2": ("breakhis2",)}
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
    scheme : str
        A name of :data:`SCHEMES`.
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
                " tissue; report them in one of those schemes: `scheme`)"
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
    scheme : str
        A name of :data:`SCHEMES`.

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
    scheme : str
        A name of :data:`SCHEMES`.

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


# Case, spaces and punctuation removed: names equal under this key are one class misspelt.
_LOOSE = re.compile(r"[\W_]+")
# A class with fewer images than this share of the largest class is probably a stray folder.
SMALL_CLASS_SHARE = 0.1
_NATURAL = re.compile(r"(\d+)")


def normalise_label(raw: str) -> str:
    """The class name of a label as found in a folder name or manifest.

    A spelling of a known name (:func:`canonical_label`: ``"In Situ"`` -> ``"insitu"``,
    ``"Ductal Carcinoma"`` -> ``"ductal_carcinoma"``) gives that name; any other label is kept
    as written, trimmed and with inner runs of white space made one space.

    Raises
    ------
    ValueError
        If `raw` is not a string or is blank.
    """
    if not isinstance(raw, str):
        raise ValueError(f"label must be a string, got {raw!r} ({type(raw).__name__})")
    text = " ".join(raw.split())
    if not text:
        raise ValueError("label is empty")
    return _ALIASES.get(_SEPARATORS.sub("", text.lower()), text)


def loose_key(name: str) -> str:
    """`name` without case, spaces or punctuation: names with one loose key are one class."""
    return _LOOSE.sub("", name.casefold())


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in _NATURAL.split(name.casefold())) + (name,)


def class_order(names: Iterable[str]) -> tuple[str, ...]:
    """Distinct class names in their stable, documented order.

    Known names (:data:`CANONICAL_LABELS`) come first in their conventional order (BACH's
    normal, benign, insitu, invasive; BreakHis's benign subtypes before the malignant ones),
    then any other names in natural order: case-insensitive, digits compared as numbers
    (``grade2`` before ``grade10``).  The order is the class-index order of models and the
    row order of reports; in pairwise tables the later class is the positive one.

    Examples
    --------
    >>> class_order(["grade10", "grade2", "Grade1"])
    ('Grade1', 'grade2', 'grade10')
    >>> class_order(["invasive", "normal", "other"])
    ('normal', 'invasive', 'other')
    """
    distinct = set(names)
    known = [n for n in CANONICAL_LABELS if n in distinct]
    return tuple(known) + tuple(sorted(distinct - set(known), key=_natural_key))


def check_class_names(counts: dict[str, int], where: str) -> list[str]:
    """Catch misspelt class names before any work; return warnings about doubtful classes.

    Parameters
    ----------
    counts : dict of str to int
        Images per class name, as found.
    where : str
        The data set (folder or manifest), named in messages.

    Returns
    -------
    list of str
        A warning for every class with fewer images than ``SMALL_CLASS_SHARE`` (10 %) of the
        largest class - often a stray or misspelt folder - naming a similar class name when
        there is one.  Also logged.

    Raises
    ------
    ValueError
        If two names differ only in case, spaces or punctuation (``Malignant`` and
        ``malignant ``, ``in-situ`` and ``in_situ`` of an unknown vocabulary): the message
        shows every class with its image count.
    """
    import difflib
    import logging

    shown = ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: _natural_key(kv[0])))
    loose: dict[str, list[str]] = {}
    for name in counts:
        loose.setdefault(loose_key(name), []).append(name)
    clashes = [sorted(names) for names in loose.values() if len(names) > 1]
    if clashes:
        pairs = "; ".join(" and ".join(repr(n) for n in names) for names in clashes)
        raise ValueError(
            f"{where}: class names {pairs} differ only in case, spaces or punctuation - probably one class "
            f"misspelt; give each class one spelling (classes found, with their image counts: {shown})"
        )
    warnings = []
    largest = max(counts.values(), default=0)
    for name, n in counts.items():
        if n < SMALL_CLASS_SHARE * largest:
            similar = difflib.get_close_matches(name, [c for c in counts if c != name], n=1, cutoff=0.6)
            hint = f"; is it a misspelling of {similar[0]!r}?" if similar else ""
            warnings.append(f"{where}: class {name!r} has only {n} image(s), under {SMALL_CLASS_SHARE:.0%} of the "
                            f"largest class{hint} (classes found: {shown})")
    for text in warnings:
        logging.getLogger(__name__).warning(text)
    return warnings
