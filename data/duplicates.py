"""The same image under two names: found by content hash, kept in one group.

Public sets contain copies of an image under other names or folders.  A copy on each side of
a cross-validation fold is leakage, so :func:`group_duplicates` finds files with identical
bytes (SHA-256 of the file, compared only among files of equal size, so most files are never
hashed) and merges the groups of all copies - and so of their patients - into one.  Copies
that are re-encoded (other format or compression) have other bytes and are not found.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import pandas as pd

from .files import file_sha256

__all__ = ["DUPLICATE_COLUMNS", "find_duplicates", "group_duplicates", "join_groups"]

log = logging.getLogger(__name__)

#: Columns of the duplicate listing: one row per file that has a copy.
DUPLICATE_COLUMNS = ("sha256", "image_id", "label", "group")


def find_duplicates(paths) -> list[list[int]]:
    """Indices of files with identical content, one list per content (sorted, each >= 2 long)."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        by_size[os.path.getsize(path)].append(i)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for same_size in by_size.values():
        if len(same_size) > 1:
            for i in same_size:
                by_hash[file_sha256(paths[i])].append(i)
    return sorted(sorted(v) for v in by_hash.values() if len(v) > 1)


def join_groups(groups, sets) -> list:
    """Groups after joining, for every set of indices in `sets`, the groups of its members (and so
    every group linked to them); a joined group takes the smallest of its ids in sort order."""
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    groups = [str(g) for g in groups]
    for members in sets:
        roots = sorted({find(groups[i]) for i in members})
        for r in roots[1:]:
            parent[r] = roots[0]
    return [find(g) for g in groups]


def group_duplicates(table: pd.DataFrame, where: str = "the data set") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge the groups of files with the same content.

    Parameters
    ----------
    table : pandas.DataFrame
        With columns ``image_id, path, label, group``.
    where : str
        Names the data set in the logged warning.

    Returns
    -------
    table : pandas.DataFrame
        A copy whose ``group`` is one id for all groups linked by a copy (the smallest of their
        ids, in sort order).
    duplicates : pandas.DataFrame
        :data:`DUPLICATE_COLUMNS` (``group`` after merging), one row per copy; empty when none.
    """
    sets = find_duplicates(table["path"].tolist())
    table = table.copy()
    if not sets:
        return table, pd.DataFrame(columns=list(DUPLICATE_COLUMNS))
    # Union-find over group ids: copies join their groups (and so their patients).
    table["group"] = join_groups(table["group"].tolist(), sets)
    rows = []
    for members in sets:
        digest = file_sha256(table["path"].iloc[members[0]])
        rows += [(digest, table["image_id"].iloc[i], table["label"].iloc[i], table["group"].iloc[i]) for i in members]
    duplicates = pd.DataFrame(rows, columns=list(DUPLICATE_COLUMNS))
    conflicting = duplicates.groupby("sha256")["label"].nunique()
    listing = "; ".join(" = ".join(table["image_id"].iloc[i] for i in members) for members in sets[:5])
    more = f" (+{len(sets) - 5} more)" if len(sets) > 5 else ""
    log.warning("%s: %d image(s) are present more than once (same file content); each set of copies is kept "
                "in one group so that no copy is on both sides of a fold: %s%s", where, len(sets), listing, more)
    if (conflicting > 1).any():
        log.warning("%s: %d set(s) of identical images carry different labels; check the labels",
                    where, int((conflicting > 1).sum()))
    return table, duplicates
