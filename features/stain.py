"""Macenko stain normalisation through staintools, with explicit, recorded fallbacks.

staintools fits and applies Macenko (stain matrix from the optical-density eigenvectors,
concentrations by SPAMS lasso).  It crashes or returns garbage on images that have no stain to
estimate (blank, white, over-exposed, single-colour); here such an image is kept unnormalised
and the reason is returned so the caller can record and report it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data.files import file_sha256
from data.io import ImageReadError, read_image
from features.transforms import scale_image

log = logging.getLogger(__name__)

# Fraction of pixels that must be tissue (LAB luminosity below the threshold): below this the
# eigen-decomposition is fitted on a handful of pixels and the stain vectors are noise.
MIN_TISSUE_FRACTION = 0.01
LUMINOSITY_THRESHOLD = 0.8


class StainNormalizationError(ValueError):
    """Macenko cannot be fitted to, or applied on, an image; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _check_stainable(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise StainNormalizationError(
            f"expected an RGB uint8 image, got shape {image.shape} dtype {image.dtype}"
        )
    luminosity = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 0] / 255.0
    tissue = float(np.mean(luminosity < LUMINOSITY_THRESHOLD))
    if tissue < MIN_TISSUE_FRACTION:
        raise StainNormalizationError(
            f"tissue mask covers {100 * tissue:.2f}% of the image (blank, white or "
            f"over-exposed); at least {100 * MIN_TISSUE_FRACTION:.0f}% is needed"
        )
    if float(image.std()) < 2.0:
        raise StainNormalizationError("image is nearly uniform: no stain to estimate")


def _stain_matrix_and_concentrations(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from staintools.miscellaneous.get_concentrations import get_concentrations
    from staintools.stain_extraction.macenko_stain_extractor import MacenkoStainExtractor

    _check_stainable(image)
    try:
        matrix = MacenkoStainExtractor.get_stain_matrix(
            image, luminosity_threshold=LUMINOSITY_THRESHOLD
        )
        concentrations = get_concentrations(image, matrix)
    except Exception as exc:  # staintools/spams raise bare Exceptions and asserts
        raise StainNormalizationError(f"Macenko failed: {type(exc).__name__}: {exc}") from exc
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise StainNormalizationError("estimated stain vectors have negative optical density")
    return matrix, concentrations


@dataclass
class MacenkoNormalizer:
    """Macenko normaliser fitted to one reference image.

    The fitted state is two small arrays (``stain_matrix`` 2x3, ``max_concentrations`` 2), kept
    in the extraction config, so a saved model reproduces the normalisation without the
    reference image file.
    """

    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None

    def fit(self, reference: np.ndarray) -> "MacenkoNormalizer":
        """Fit to ``reference`` (RGB uint8); raises :class:`StainNormalizationError`."""
        matrix, concentrations = _stain_matrix_and_concentrations(reference)
        max_c = np.percentile(concentrations, 99, axis=0)
        if np.any(max_c <= 0):
            raise StainNormalizationError("reference has a stain with zero concentration")
        # Rounded so that a normaliser rebuilt from the JSON config is bit-identical.
        self.stain_matrix, self.max_concentrations = np.round(matrix, 8), np.round(max_c, 8)
        return self

    @classmethod
    def from_params(cls, params: dict) -> "MacenkoNormalizer":
        return cls(np.asarray(params["stain_matrix"], dtype=np.float64),
                   np.asarray(params["max_concentrations"], dtype=np.float64))

    def params(self) -> dict:
        """JSON-serialisable fitted state."""
        return {
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
        }

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalise ``image``; raises :class:`StainNormalizationError` when it cannot."""
        if self.stain_matrix is None:
            raise RuntimeError("MacenkoNormalizer is not fitted; call fit() first")
        _, concentrations = _stain_matrix_and_concentrations(image)
        max_c = np.percentile(concentrations, 99, axis=0)
        if np.any(max_c <= 0):
            raise StainNormalizationError("a stain has zero concentration in this image")
        concentrations *= self.max_concentrations / max_c
        od = concentrations @ self.stain_matrix
        out = 255.0 * np.exp(-od)
        if not np.all(np.isfinite(out)):
            raise StainNormalizationError("normalisation produced non-finite values")
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(image.shape)

    def transform_or_keep(self, image: np.ndarray) -> tuple[np.ndarray, str | None]:
        """``(normalised, None)``, or ``(image, reason)`` when normalisation cannot work."""
        try:
            return self.transform(image), None
        except StainNormalizationError as exc:
            return image, exc.reason


# How many images the stain reference is chosen among (spread over the dataset).
REFERENCE_CANDIDATES = 16


def fit_stain_reference(
    dataset: pd.DataFrame, scale: float, reference: str | Path | None = None
) -> dict:
    """Fit Macenko to a reference image and return the ``stain`` entry of the config.

    With ``reference=None`` the reference is chosen from the data: among up to
    ``REFERENCE_CANDIDATES`` images spread evenly over the dataset, the medoid of their stain
    matrices (the most typical staining), so no single odd slide sets the target.
    """
    if reference is not None:
        image = scale_image(read_image(reference), scale)
        try:
            normalizer = MacenkoNormalizer().fit(image)
        except StainNormalizationError as exc:
            raise StainNormalizationError(
                f"stain reference '{reference}' cannot be used: {exc.reason}"
            ) from exc
        ref_name, ref_path = str(reference), Path(reference)
    else:
        picks = np.unique(np.linspace(0, len(dataset) - 1, REFERENCE_CANDIDATES).round().astype(int))
        fitted = []
        for i in picks:
            row = dataset.iloc[i]
            try:
                fitted.append((row, MacenkoNormalizer().fit(scale_image(read_image(row.path), scale))))
            except (ImageReadError, StainNormalizationError) as exc:
                log.info("not a stain reference candidate: %s (%s)", row.image_id, exc)
        if not fitted:
            raise StainNormalizationError(
                "no image of the dataset can serve as Macenko reference; give one with "
                "`stain_reference` or disable normalisation with `stain_reference='none'`"
            )
        vectors = np.stack([n.stain_matrix.ravel() for _, n in fitted])
        distances = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1).sum(axis=1)
        row, normalizer = fitted[int(np.argmin(distances))]
        ref_name, ref_path = str(row.image_id), Path(row.path)
    return {
        "method": "macenko",
        "reference": ref_name,
        "reference_sha256": file_sha256(ref_path),
        **normalizer.params(),
    }
