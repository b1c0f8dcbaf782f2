"""Per-image decisions from the predictions on its augmentations.

Two rules, both reported:

* **majority voting** -- each augmentation votes for its most probable class
  (``argmax``; on an exact probability tie the lowest class index); the image
  takes the class with most votes.  Tie-break among classes with equally many
  votes: the highest mean probability over the image's augmentations, then
  the lowest class index.
* **mean-probability voting** -- the class with the highest mean probability
  (ties: lowest class index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VoteResult:
    """Image-level decisions.

    Attributes
    ----------
    votes : ndarray of int, shape (n_images, n_classes)
        Number of augmentations predicting each class.
    mean_proba : ndarray of float, shape (n_images, n_classes)
        Mean predicted probability over the image's augmentations.
    majority : ndarray of int, shape (n_images,)
        Class index by majority voting (with the documented tie-break).
    mean_proba_argmax : ndarray of int, shape (n_images,)
        Class index by mean-probability voting.
    """

    votes: np.ndarray
    mean_proba: np.ndarray
    majority: np.ndarray
    mean_proba_argmax: np.ndarray


def vote(row_image, row_proba, n_images: int | None = None) -> VoteResult:
    """Aggregate augmentation-level probabilities into image-level decisions.

    Parameters
    ----------
    row_image : array-like of int, shape (n_rows,)
        Image index (0 .. n_images-1) of each row.
    row_proba : array-like of float, shape (n_rows, n_classes)
        Predicted class probabilities of each row.
    n_images : int, optional
        Number of images; default ``max(row_image) + 1``.  Every image must
        have at least one row.

    Returns
    -------
    VoteResult
    """
    row_image = np.asarray(row_image, dtype=int)
    proba = np.asarray(row_proba, dtype=float)
    if proba.ndim != 2 or proba.shape[0] != row_image.shape[0]:
        raise ValueError(f"row_proba must be (n_rows, n_classes) with n_rows={len(row_image)}, got {proba.shape}")
    n_images = int(row_image.max()) + 1 if n_images is None else int(n_images)
    n_classes = proba.shape[1]
    counts = np.bincount(row_image, minlength=n_images)
    if (counts == 0).any():
        raise ValueError(f"images without any row: {np.flatnonzero(counts == 0)[:10].tolist()}")

    row_pred = np.argmax(proba, axis=1)  # first max -> lowest index on exact ties
    votes = np.zeros((n_images, n_classes), dtype=int)
    np.add.at(votes, (row_image, row_pred), 1)
    sums = np.zeros((n_images, n_classes))
    np.add.at(sums, row_image, proba)
    mean_proba = sums / counts[:, None]

    tied = votes == votes.max(axis=1, keepdims=True)
    # Only tied classes compete; argmax then takes the highest mean probability
    # and, among equal means, the lowest class index.
    majority = np.argmax(np.where(tied, mean_proba, -np.inf), axis=1)
    return VoteResult(votes, mean_proba, majority, np.argmax(mean_proba, axis=1))
