"""Image transforms shared by extraction, heatmaps and the CNN classifiers."""
from __future__ import annotations

import cv2
import numpy as np


def scale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize by ``scale`` (area averaging when shrinking, as it does not alias)."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interp)
