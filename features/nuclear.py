"""Hand-crafted nuclear statistics from the haematoxylin channel: the ``nuclear_stats`` backbone.

CNN features pooled over a whole photo describe texture and architecture; they see single
nuclei only faintly.  These 41 numbers describe the nuclei directly (issue 15, "features beyond
the CNN"): the haematoxylin concentration by colour deconvolution (Ruifrok & Johnston,
``skimage.color.rgb2hed``), smoothed (Gaussian, sigma 1 px) and split by Otsu's threshold into
nuclei, opened by a 3x3 square; connected components of 8-2000 px are nuclei.  Then:

- density (nuclei per 10^4 px) and the nuclear fraction of the area;
- area, eccentricity, solidity and mean haematoxylin of the nuclei: mean, sd, 10th, 50th and
  90th percentile each; circularity ``4 pi area / perimeter^2``: mean and sd;
- mean and sd of the haematoxylin and eosin channels, and the Otsu threshold;
- grey-level co-occurrence texture of the haematoxylin channel (32 levels, distances 1, 3 and
  9 px, horizontal and vertical averaged): contrast, homogeneity, energy, correlation.

They are computed once per image, on the prepared (scaled, stain-normalised) photo without
colour augmentation, and repeated for every augmentation row of the store: the augmentations
would only move the threshold a little, at 8x the cost (about 0.65 s per 1024x768 image on one
core).  Alone they classify BACH poorly; concatenated to CNN features they add what the CNN
misses (docs/accuracy.md).  Measured by scikit-image, which implements every step above: an
optional dependency (``pip install scikit-image``, or the ``nuclear`` extra), checked when the
extractor is built, before any image is read.
"""
from __future__ import annotations

import numpy as np

_SHAPE = ("area", "eccentricity", "solidity", "intensity_mean")
_GLCM = ("contrast", "homogeneity", "energy", "correlation")
_DISTANCES = (1, 3, 9)

#: Names of the features, in store column order.
FEATURE_NAMES = (
    ("density", "nuclear_fraction")
    + tuple(f"{p}_{s}" for p in _SHAPE for s in ("mean", "sd", "p10", "p50", "p90"))
    + ("circularity_mean", "circularity_sd", "h_mean", "h_sd", "e_mean", "e_sd", "h_threshold")
    + tuple(f"glcm_{p}_{d}" for p in _GLCM for d in _DISTANCES)
)

INSTALL_HINT = ("backbone nuclear_stats needs scikit-image: pip install scikit-image "
                "(or pip install -e \".[nuclear]\" in a source checkout)")

#: Smallest side the statistics are computed on (the 9 px co-occurrence distance, a few nuclei).
MIN_SIDE = 32


def nuclear_statistics(rgb: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` statistics of one RGB uint8 image, as float32.

    An image without any nucleus gives zeros for the nuclear statistics (not NaN).
    """
    import cv2
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops_table

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"nuclear statistics take an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise ValueError(f"nuclear statistics need images of at least {MIN_SIDE} px, got {rgb.shape[:2]}")
    hed = rgb2hed(rgb)
    h, e = hed[..., 0].astype(np.float32), hed[..., 1]
    smooth = cv2.GaussianBlur(h, (0, 0), 1.0)
    threshold = float(threshold_otsu(smooth)) if np.ptp(smooth) > 0 else float(smooth.max())
    mask = cv2.morphologyEx((smooth > threshold).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    props = regionprops_table(label(mask), intensity_image=h,
                              properties=("area", "eccentricity", "solidity", "intensity_mean", "perimeter"))
    keep = (props["area"] >= 8) & (props["area"] <= 2000)
    props = {k: np.asarray(v, dtype=np.float64)[keep] for k, v in props.items()}
    n = int(keep.sum())
    values = [n / h.size * 1e4, props["area"].sum() / h.size]
    for name in _SHAPE:
        v = props[name] if n else np.zeros(1)
        values += [v.mean(), v.std(), *np.percentile(v, [10, 50, 90])]
    circularity = 4 * np.pi * props["area"] / np.maximum(props["perimeter"], 1) ** 2 if n else np.zeros(1)
    values += [circularity.mean(), circularity.std(), h.mean(), h.std(), e.mean(), e.std(), threshold]
    levels = np.clip((smooth - smooth.min()) / (np.ptp(smooth) + 1e-9) * 31, 0, 31).astype(np.uint8)
    glcm = graycomatrix(levels, distances=list(_DISTANCES), angles=[0, np.pi / 2], levels=32,
                        symmetric=True, normed=True)
    for name in _GLCM:
        values += list(graycoprops(glcm, name).mean(axis=1))
    return np.nan_to_num(np.asarray(values, dtype=np.float32))


class NuclearStatisticsExtractor:
    """The extractor of the ``nuclear_stats`` backbone: the interface of
    :class:`features.extract.FeatureExtractor` in whole-image mode, computed on the host.

    Parameters
    ----------
    config : the resolved extraction config; mode ``"whole"``, engine ``"keras"`` (the default:
        no network runs, so no other engine applies).
    batch_size : accepted for the common interface; unused.
    """

    device = "CPU (hand-crafted statistics, scikit-image)"

    def __init__(self, config, batch_size: int | None = None):
        if config.mode != "whole":
            raise ValueError(f"backbone {config.backbone} describes the whole image: use --mode whole, "
                             f"not {config.mode!r}")
        if config.engine != "keras":
            raise ValueError(f"backbone {config.backbone} runs no network: --engine {config.engine} "
                             "does not apply (leave the default)")
        if config.instances != "none":
            raise ValueError(f"backbone {config.backbone} has no feature map: --instances does not apply")
        try:
            import skimage  # noqa: F401
        except ImportError as exc:
            raise ValueError(INSTALL_HINT) from exc
        self.config = config
        self.batch_size = config.batch_size if batch_size is None else batch_size
        self.feature_dim = len(FEATURE_NAMES)
        self._last = (None, None)  # (image, statistics): one image's augmentations come in batches

    def check_side(self, side: int) -> None:
        if side < MIN_SIDE:
            raise ValueError(f"image side {side} px is below the {MIN_SIDE} px nuclear statistics need")

    def to_device(self, image: np.ndarray) -> np.ndarray:
        return image

    def augmented_pooled(self, image, luts: np.ndarray, windows: np.ndarray | None,
                         pooling: str = "mean", pad_to: int | None = None,
                         instances: str = "none") -> np.ndarray:
        """The image's statistics once per augmentation (``(len(luts), 41)``); see the module
        docstring for why the colour tables are not applied."""
        if windows is not None:
            raise ValueError("nuclear statistics describe the whole image; crop windows do not apply")
        if self._last[0] is not image:
            self._last = (image, nuclear_statistics(image))
        return np.repeat(self._last[1][None], len(luts), axis=0)

    def crop_features(self, image, luts, windows):
        raise ValueError(f"backbone {self.config.backbone} describes the whole image: use --mode whole")

    def feature_maps(self, images, pad_to=None):
        raise ValueError(f"backbone {self.config.backbone} has no feature map: heatmaps and shared "
                         "crops need a CNN backbone")
