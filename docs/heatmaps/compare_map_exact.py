"""How close feature-map pooling is to running every window through the backbone (README numbers).

::

    python docs/heatmaps/compare_map_exact.py MODEL_DIR WINDOW:STEP [WINDOW:STEP ...]

For 8 bach-dev images (2 per class), every window of the grid gets its feature both ways
(``classifiers.heatmaps.pooled_window_features`` / ``exact_window_features``, same scaled and
stain-normalised image); prints the cosine similarity of the features, the mean absolute
difference of the model's class probabilities, how often the top class agrees, the per-image
correlation of the probabilities, and the time of each path.
"""
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from classifiers.heatmaps import FeatureSource, exact_window_features, pooled_window_features, window_grid  # noqa: E402
from classifiers.feature.model_io import load_model  # noqa: E402
from classifiers.feature.predict import reproducible_configs  # noqa: E402
from data.io import read_image  # noqa: E402
from features.extract import FeatureExtractor  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "bach-dev")
IMAGES = ["normal/n038.jpg", "normal/n069.jpg", "benign/b010.jpg", "benign/b045.jpg",
          "insitu/is030.jpg", "insitu/is080.jpg", "invasive/iv063.jpg", "invasive/iv021.jpg"]


def main(model_dir: str, sizes: list) -> None:
    model = load_model(model_dir)
    config = reproducible_configs(model)[0]
    source = FeatureSource(FeatureExtractor(config, batch_size=1), config.scale, config.stain)
    exact_extractor = FeatureExtractor(config, batch_size=8)
    for window, step in sizes:
        cos, diff, agree, corr, t_map, t_exact, n = [], [], [], [], 0.0, 0.0, 0
        for rel in IMAGES:
            image, _ = source.prepare(read_image(os.path.join(ROOT, rel)))
            grid = window_grid(*image.shape[:2], window, step)
            t0 = time.perf_counter()
            pooled = pooled_window_features(image, source.extractor, grid)
            t1 = time.perf_counter()
            exact = exact_window_features(image, exact_extractor, grid)
            t_map, t_exact, n = t_map + t1 - t0, t_exact + time.perf_counter() - t1, n + len(pooled)
            cos += list((pooled * exact).sum(1) / np.linalg.norm(pooled, axis=1) / np.linalg.norm(exact, axis=1))
            p_map, p_exact = model.fitted.predict_proba([pooled]), model.fitted.predict_proba([exact])
            diff += list(np.abs(p_map - p_exact).mean(1))
            agree += list(p_map.argmax(1) == p_exact.argmax(1))
            corr.append(np.corrcoef(p_map.ravel(), p_exact.ravel())[0, 1])
        print(f"window {window} step {step}: {n} windows on {len(IMAGES)} images; feature cosine mean "
              f"{np.mean(cos):.3f} (min {np.min(cos):.3f}); |p_map - p_exact| mean {np.mean(diff):.3f}; "
              f"top class agrees on {100 * np.mean(agree):.0f}% of windows; per-image r(p) mean "
              f"{np.nanmean(corr):.2f}; time map {t_map:.1f} s vs exact {t_exact:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], [tuple(int(v) for v in a.split(":")) for a in sys.argv[2:]])
