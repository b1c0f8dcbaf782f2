"""Train the README heatmap model: a feature store minus one image (held out for the heatmap).

``python -m pipeline.train`` has no option to leave an image out, so this does what it does
(same classifier, defaults and model directory) on the store's rows minus one image::

    python docs/heatmaps/train_minus_one.py STORE_DIR IMAGE_ID MODEL_DIR

IMAGE_ID is the store's id, e.g. ``invasive/iv063.jpg``.
"""
import os
import sys
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before XGBoost loads (see pipeline/cv_report.py)

from classifiers.dataset import build_dataset  # noqa: E402
from classifiers.model_io import TrainConfig, save_model, train_model  # noqa: E402
from features.store import load_store  # noqa: E402


def main(store: str, held_out: str, out: str) -> None:
    table = load_store(store)
    keep = (table.meta["image_id"] != held_out).to_numpy()
    if keep.all():
        raise SystemExit(f"{held_out} is not in {store}")
    table = replace(table, meta=table.meta[keep].reset_index(drop=True), X=table.X[keep])
    model = train_model(build_dataset([table], "bach4"), TrainConfig(scheme="bach4", classifier="xgboost"))
    print(save_model(model, out, overwrite=True), model.training)


if __name__ == "__main__":
    main(*sys.argv[1:4])
