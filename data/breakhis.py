"""BreakHis file names: label, subtype, patient and magnification.

BreakHis (Spanhol et al. 2016; 7,909 PNGs of 700x460 from 82 patients) names every image
``<procedure>_<B|M>_<subtype>-<year>-<slide>-<magnification>-<index>.png``, e.g.
``SOB_B_A-14-22549AB-40-001.png``: surgical open biopsy, benign, adenosis, slide ``14-22549AB``,
40x, image 1.  The tree it ships as is
``BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<subtype>/<patient>/<mag>X/*.png``;
only the file names are read, so any folder or manifest of such files works.

Patients.  A slide id such as ``14-22549AB`` is one patient folder of the distribution (82
of them).  Ids that share the year-number part (``14-22549AB``, ``14-22549CD``, ``14-22549G``;
``14-29960AB`` fibroadenoma and ``14-29960CD`` adenosis) are most likely slides of one patient.
:data:`PATIENT_GROUPINGS`: ``number`` (the default) groups by the shared number - the stricter
choice, because a patient on both sides of a fold inflates accuracy, and a product that reports
honest accuracy must not leak; ``slide`` uses the ids as distributed, the 82 "patients" of
Spanhol et al.'s protocol, to compare with published results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .labels import BREAKHIS_SUBTYPES

__all__ = ["MAGNIFICATIONS", "PATIENT_GROUPINGS", "BreakHisName", "is_breakhis_like", "parse_name"]

#: BreakHis magnification factors (objective x eyepiece), as in the file names.
MAGNIFICATIONS: tuple[str, ...] = ("40", "100", "200", "400")
#: How BreakHis images are grouped into patients; the first is the default (module docstring).
PATIENT_GROUPINGS: tuple[str, ...] = ("number", "slide")

_BENIGN_CODES = ("A", "F", "PT", "TA")
_NAME = re.compile(
    r"^(?P<procedure>[A-Z]+)_(?P<tumour>[BM])_(?P<code>[A-Z]{1,2})-(?P<year>\d{2})-(?P<number>\d+)(?P<suffix>[A-Z]*)"
    r"-(?P<magnification>\d+)-(?P<index>\d+)\.png$", re.IGNORECASE)
# What makes a name "BreakHis-like": the procedure_B|M_ prefix. Such a name must parse.
_LIKE = re.compile(r"^SOB[_-]", re.IGNORECASE)


@dataclass(frozen=True)
class BreakHisName:
    """What a BreakHis file name holds.

    Attributes
    ----------
    tumour : {'benign', 'malignant'}
    subtype : str
        One of :data:`data.labels.BREAKHIS_SUBTYPES`' names, e.g. ``ductal_carcinoma``.
    slide : str
        ``<year>-<slide>`` as written, e.g. ``14-22549AB``.
    number : str
        ``<year>-<number>``, e.g. ``14-22549``.
    magnification : str
        ``40``, ``100``, ``200`` or ``400``.
    index : int
    """

    tumour: str
    subtype: str
    slide: str
    number: str
    magnification: str
    index: int

    def patient(self, grouping: str = "number") -> str:
        """The patient group id under `grouping` (:data:`PATIENT_GROUPINGS`)."""
        if grouping not in PATIENT_GROUPINGS:
            raise ValueError(f"unknown BreakHis patient grouping {grouping!r}; choose {', '.join(PATIENT_GROUPINGS)}")
        return self.number if grouping == "number" else self.slide


def is_breakhis_like(filename: str) -> bool:
    """Whether a file name looks like BreakHis's (``SOB_...``): such a name must then parse."""
    return bool(_LIKE.match(filename))


def parse_name(filename: str) -> BreakHisName:
    """Parse a BreakHis file name (the base name; folders are ignored).

    Raises
    ------
    ValueError
        If the name does not follow the BreakHis pattern, names an unknown subtype or
        magnification, or its B/M letter contradicts the subtype; the message shows the
        expected form.
    """
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    match = _NAME.match(base)
    expected = ("expected <procedure>_<B|M>_<subtype>-<year>-<slide>-<magnification>-<index>.png, "
                "e.g. SOB_B_A-14-22549AB-40-001.png")
    if match is None:
        raise ValueError(f"BreakHis file name {base!r} does not parse: {expected}")
    code, tumour = match["code"].upper(), match["tumour"].upper()
    if code not in BREAKHIS_SUBTYPES:
        raise ValueError(f"BreakHis file name {base!r}: unknown subtype {match['code']!r}; "
                         f"BreakHis subtypes are {', '.join(BREAKHIS_SUBTYPES)}")
    if (code in _BENIGN_CODES) != (tumour == "B"):
        raise ValueError(f"BreakHis file name {base!r}: subtype {code} ({BREAKHIS_SUBTYPES[code]}) is "
                         f"{'benign' if code in _BENIGN_CODES else 'malignant'}, but the name says {tumour}")
    if match["magnification"] not in MAGNIFICATIONS:
        raise ValueError(f"BreakHis file name {base!r}: magnification {match['magnification']} is not one of "
                         f"{', '.join(MAGNIFICATIONS)}")
    number = f"{match['year']}-{match['number']}"
    return BreakHisName(
        tumour="benign" if tumour == "B" else "malignant",
        subtype=BREAKHIS_SUBTYPES[code],
        slide=f"{number}{match['suffix'].upper()}",
        number=number,
        magnification=match["magnification"],
        index=int(match["index"]),
    )
