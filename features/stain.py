"""Stain normalisation (Macenko or Vahadane) through staintools, with explicit, recorded fallbacks.

staintools estimates each image's two stain vectors, by Macenko (the optical-density
eigenvectors) or by Vahadane (sparse non-negative dictionary learning, SPAMS; 0.3 s for a
1024 x 768 image against Macenko's 0.1 s), and the concentrations by SPAMS lasso.  It crashes or returns garbage on images that have no stain to
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
    """Stain normalisation cannot be fitted to, or applied on, an image; ``reason`` says why."""

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


def _macenko_matrix(image: np.ndarray) -> np.ndarray:
    from staintools.stain_extraction.macenko_stain_extractor import MacenkoStainExtractor

    return MacenkoStainExtractor.get_stain_matrix(image, luminosity_threshold=LUMINOSITY_THRESHOLD)


# Dictionary-learning iterations and mini-batch of Vahadane's SPAMS fit.
VAHADANE_ITERATIONS, VAHADANE_BATCH = 300, 2048


def _vahadane_matrix(image: np.ndarray) -> np.ndarray:
    # staintools' VahadaneStainExtractor calls spams.trainDL with its defaults: all threads and
    # iter=-1, i.e. "learn for one second", so two runs on the same image differ.  A fixed
    # iteration count on one thread is reproducible (and 0.3 s for 1024 x 768).
    import spams
    from staintools.miscellaneous.miscellaneous_functions import normalize_matrix_rows
    from staintools.miscellaneous.optical_density_conversion import convert_RGB_to_OD
    from staintools.tissue_masks.luminosity_threshold_tissue_locator import LuminosityThresholdTissueLocator

    mask = LuminosityThresholdTissueLocator.get_tissue_mask(
        image, luminosity_threshold=LUMINOSITY_THRESHOLD).reshape(-1)
    od = np.asfortranarray(convert_RGB_to_OD(image).reshape(-1, 3)[mask].T)
    dictionary = spams.trainDL(X=od, K=2, lambda1=0.1, mode=2, modeD=0, posAlpha=True, posD=True,
                               verbose=False, numThreads=1, iter=VAHADANE_ITERATIONS,
                               batchsize=VAHADANE_BATCH).T
    if dictionary[0, 0] < dictionary[1, 0]:  # haematoxylin first, as staintools orders it
        dictionary = dictionary[[1, 0], :]
    return normalize_matrix_rows(dictionary)


#: Stain-vector estimators: method name -> function of an RGB uint8 image giving its 2 x 3
#: unit optical-density stain matrix (haematoxylin first).
STAIN_METHODS = {"macenko": _macenko_matrix, "vahadane": _vahadane_matrix}


def check_stain_method(method: str) -> str:
    """``method`` if it is a key of :data:`STAIN_METHODS`, else a ValueError naming them."""
    if method not in STAIN_METHODS:
        raise ValueError(f"unknown stain method {method!r}; choose one of {', '.join(STAIN_METHODS)}")
    return method


def _stain_matrix_and_concentrations(image: np.ndarray, method: str = "macenko"
                                     ) -> tuple[np.ndarray, np.ndarray]:
    from staintools.miscellaneous.get_concentrations import get_concentrations

    estimate = STAIN_METHODS[check_stain_method(method)]
    _check_stainable(image)
    try:
        matrix = estimate(image)
        concentrations = get_concentrations(image, matrix)
    except Exception as exc:  # staintools/spams raise bare Exceptions and asserts
        raise StainNormalizationError(
            f"{method.capitalize()} failed: {type(exc).__name__}: {exc}") from exc
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise StainNormalizationError("estimated stain vectors have negative optical density")
    return matrix, concentrations


@dataclass
class StainNormalizer:
    """Stain normaliser fitted to one reference image (Reinhard-style concentration rescaling).

    The fitted state is two small arrays (``stain_matrix`` 2x3, ``max_concentrations`` 2) and
    the ``method`` that estimates every image's stain vectors (:data:`STAIN_METHODS`), kept in
    the extraction config, so a saved model reproduces the normalisation without the reference
    image file.
    """

    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    method: str = "macenko"

    def __post_init__(self):
        check_stain_method(self.method)

    def fit(self, reference: np.ndarray) -> "StainNormalizer":
        """Fit to ``reference`` (RGB uint8); raises :class:`StainNormalizationError`."""
        matrix, concentrations = _stain_matrix_and_concentrations(reference, self.method)
        max_c = np.percentile(concentrations, 99, axis=0)
        if np.any(max_c <= 0):
            raise StainNormalizationError("reference has a stain with zero concentration")
        # Rounded so that a normaliser rebuilt from the JSON config is bit-identical.
        self.stain_matrix, self.max_concentrations = np.round(matrix, 8), np.round(max_c, 8)
        return self

    @classmethod
    def from_params(cls, params: dict) -> "StainNormalizer":
        """The normaliser of a config's ``stain`` entry (written before ``method`` existed: Macenko)."""
        return cls(np.asarray(params["stain_matrix"], dtype=np.float64),
                   np.asarray(params["max_concentrations"], dtype=np.float64),
                   params.get("method", "macenko"))

    def params(self) -> dict:
        """JSON-serialisable fitted state."""
        return {
            "method": self.method,
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
        }

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalise ``image``; raises :class:`StainNormalizationError` when it cannot."""
        if self.stain_matrix is None:
            raise RuntimeError("StainNormalizer is not fitted; call fit() first")
        _, concentrations = _stain_matrix_and_concentrations(image, self.method)
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
    dataset: pd.DataFrame, scale: float, reference: str | Path | None = None, method: str = "macenko"
) -> dict:
    """Fit a stain normaliser (``method``: :data:`STAIN_METHODS`) to a reference image and return
    the ``stain`` entry of the config.

    With ``reference=None`` the reference is chosen from the data: among up to
    ``REFERENCE_CANDIDATES`` images spread evenly over the dataset, the medoid of their stain
    matrices (the most typical staining), so no single odd slide sets the target.
    """
    if reference is not None:
        image = scale_image(read_image(reference), scale)
        try:
            normalizer = StainNormalizer(method=method).fit(image)
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
                fitted.append((row, StainNormalizer(method=method).fit(
                    scale_image(read_image(row.path), scale))))
            except (ImageReadError, StainNormalizationError) as exc:
                log.info("not a stain reference candidate: %s (%s)", row.image_id, exc)
        if not fitted:
            raise StainNormalizationError(
                f"no image of the dataset can serve as {method.capitalize()} reference; give one with "
                "`stain_reference` or disable normalisation with `stain_reference='none'`"
            )
        vectors = np.stack([n.stain_matrix.ravel() for _, n in fitted])
        distances = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1).sum(axis=1)
        row, normalizer = fitted[int(np.argmin(distances))]
        ref_name, ref_path = str(row.image_id), Path(row.path)
    # Key order as before `method` was a choice, so Macenko configs hash as they always did.
    return {
        "method": normalizer.method,
        "reference": ref_name,
        "reference_sha256": file_sha256(ref_path),
        **normalizer.params(),
    }
