"""The misclassified images of a run, most confident errors first, with thumbnails.

A pathologist looks at the errors before trusting any number: :func:`misclassified` lists
them (truth, prediction, votes, mean probabilities) and :func:`thumbnail_jpeg` gives the small
JPEG the HTML report embeds, so ``report.html`` stays one self-contained file.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from data.io import ImageReadError, read_image

#: Longest side of a thumbnail in pixels, and its JPEG quality (small enough for hundreds).
THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 80


def misclassified(predictions: pd.DataFrame, classes, paths: dict | None = None) -> pd.DataFrame:
    """The images whose majority vote is wrong, most confident first.

    Parameters
    ----------
    predictions : pandas.DataFrame
        Per-image table of one run (``image_id``, ``truth``, ``prediction``, ``fold``,
        ``n_aug``, ``votes_<class>``, ``proba_<class>``).
    classes : sequence of str
    paths : dict, optional
        ``image_id -> image path`` (from the store), copied into a ``path`` column.

    Returns
    -------
    pandas.DataFrame
        ``image_id``, ``truth``, ``prediction``, ``votes`` (for the prediction), ``n_aug``,
        ``proba_prediction`` and ``proba_truth`` (mean probabilities), ``fold``, ``path``;
        sorted by ``proba_prediction`` descending (ties by ``image_id``).
    """
    wrong = predictions[predictions["truth"].astype(str) != predictions["prediction"].astype(str)]
    rows = []
    for _, r in wrong.iterrows():
        pred, truth = str(r["prediction"]), str(r["truth"])
        rows.append({
            "image_id": r["image_id"],
            "truth": truth,
            "prediction": pred,
            "votes": int(r[f"votes_{pred}"]),
            "n_aug": int(r["n_aug"]),
            "proba_prediction": float(r[f"proba_{pred}"]),
            "proba_truth": float(r[f"proba_{truth}"]) if f"proba_{truth}" in r else float("nan"),
            "fold": int(r["fold"]),
            "path": (paths or {}).get(r["image_id"], ""),
        })
    columns = ["image_id", "truth", "prediction", "votes", "n_aug", "proba_prediction", "proba_truth", "fold", "path"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["proba_prediction", "image_id"], ascending=[False, True], kind="stable").reset_index(drop=True)


def thumbnail_jpeg(path, side: int = THUMBNAIL_SIDE, quality: int = THUMBNAIL_QUALITY) -> bytes | None:
    """A JPEG of the image with its longest side ``side`` px, or ``None`` when it cannot be read
    (moved or deleted since extraction: the gallery then says so instead of failing)."""
    if not path:
        return None
    try:
        rgb = read_image(path)
    except (ImageReadError, OSError, ValueError):
        return None
    h, w = rgb.shape[:2]
    factor = side / max(h, w)
    if factor < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return data.tobytes() if ok else None
