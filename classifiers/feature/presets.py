"""Named best configurations: which stores to extract and how to classify them.

A preset is the outcome of the comparison in README ("Accuracy on bach-dev"): the stores
(extraction options, one store each) and the classifier, fusion and tuning that scored best
in repeated grouped CV.  ``pipeline.extract --preset NAME`` extracts its stores into one root;
``pipeline.cv_report --preset NAME`` and ``pipeline.train --preset NAME`` find them there by
their configs.  Changing a preset changes what users get by default: rerun the comparison and
update README with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: Extraction options a preset fixes; every other option (stain reference, seed, precision,
#: batch size, dask) stays the user's.
STORE_FIELDS = ("backbone", "mode", "scale", "augmentations", "crops", "crop_size", "pooling")


@dataclass(frozen=True)
class Preset:
    """A documented configuration.

    Parameters
    ----------
    name : str
    description : str
        One line for ``--help`` and the logs.
    stores : tuple of dict
        Extraction options of each store (keys from :data:`STORE_FIELDS`).
    classifier : str
        A name of ``classifiers.feature.estimators.CLASSIFIER_NAMES``.
    fusion : {"concat", "mean-proba"}
        How the stores are combined.
    tune : bool
        Inner-CV hyper-parameter choice (``classifiers.feature.tuning``).
    seconds_per_image : float
        Extraction time of all its stores per 2048x1536 photo on 2 CPU cores, measured on
        bach-dev (docs/extraction.md); ``pipeline.extract`` states the expected time from it.
    """

    name: str
    description: str
    stores: tuple
    classifier: str
    fusion: str
    tune: bool
    seconds_per_image: float

    def expected_time(self, n_images: int) -> str:
        """What extracting ``n_images`` photos should take, as one line for the log."""
        minutes = n_images * self.seconds_per_image / 60
        return (f"preset {self.name}: expect about {max(1, round(minutes))} min for {n_images} images on 2 CPU "
                f"cores ({self.seconds_per_image:g} s per 2048x1536 photo measured on bach-dev; longer on a "
                "busy machine, shorter for smaller images or images already in the store)")


def _store(backbone, mode, scale, crops=1, crop_size=0, pooling="mean"):
    return {"backbone": backbone, "mode": mode, "scale": scale, "augmentations": 8,
            "crops": crops, "crop_size": crop_size, "pooling": pooling}


PRESETS = {
    # Best 4-class accuracy on the 300 bach-dev images (docs/accuracy.md): Lite1 with the signed
    # square root, 85.8 +- 0.2 % over fold seeds 0 1 2 and 86.2 +- 0.5 % over fresh seeds 3 4 5,
    # above the former bach (Lite0 + Lite1 averaged) on 5 of 6 seeds, at 0.57x its extraction.
    # Runner-up: that former bach, 84.9 +- 1.2 %.
    "bach": Preset(
        name="bach",
        description="EfficientNet-Lite1 multi-level features of the whole image at scale 0.5, "
        "8 colour augmentations, signed square root, logistic regression with C chosen by "
        "inner grouped CV",
        stores=(_store("efficientnet_lite1_multilevel", "whole", 0.5),),
        classifier="logreg-sqrt",
        fusion="concat",  # one store: no fusion
        tune=True,
        seconds_per_image=2.3,  # 685 s for 300 on a clean clone, load 4-5
    ),
    # The cheapest store of the comparison on 300 images (83.1 +- 0.4 %), 0.75x bach's
    # extraction time; the signed square root does not help it (83.1 +- 1.2 %).
    "bach-fast": Preset(
        name="bach-fast",
        description="EfficientNet-Lite0 multi-level features (block groups of stride 8-32 and the "
        "head) of the whole image at scale 0.5, 8 colour augmentations, logistic regression "
        "with C chosen by inner grouped CV",
        stores=(_store("efficientnet_lite0_multilevel", "whole", 0.5),),
        classifier="logreg",
        fusion="concat",  # one store: no fusion
        tune=True,
        seconds_per_image=2.1,  # 209 s per 100 images with a light load (an earlier session)
    ),
}
PRESET_NAMES = tuple(PRESETS)


class PresetStoreError(ValueError):
    """The stores a preset needs are not where the user pointed."""


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}") from None


def _store_dirs(paths) -> list:
    dirs = []
    for path in map(Path, paths):
        if (path / "config.json").is_file():
            dirs.append(path)
        elif path.is_dir():
            dirs.extend(sorted(p for p in path.iterdir() if (p / "config.json").is_file()))
        else:
            raise PresetStoreError(f"feature store or store root not found: {path}")
    return dirs


def matches(store_config: dict, options: dict) -> bool:
    """Whether a store's ``config.json`` has every option of a preset store."""
    return all(store_config.get(k) == v for k, v in options.items())


def select_stores(preset: Preset, paths) -> list:
    """The store directory of each of ``preset.stores`` among ``paths`` (stores or roots).

    Raises
    ------
    PresetStoreError
        When a store is missing (with the command that makes it) or matched twice.
    """
    candidates = [(d, json.loads((d / "config.json").read_text())) for d in _store_dirs(paths)]
    chosen = []
    for options in preset.stores:
        found = [d for d, cfg in candidates if matches(cfg, options)]
        described = ", ".join(f"{k}={v}" for k, v in options.items())
        if not found:
            raise PresetStoreError(
                f"preset {preset.name!r} needs a store with {described}, not found in "
                f"{', '.join(map(str, paths))}; run python -m pipeline.extract --preset "
                f"{preset.name} --data DATA --out ROOT and pass ROOT"
            )
        if len(found) > 1:
            raise PresetStoreError(
                f"preset {preset.name!r}: several stores match {described} ({', '.join(map(str, found))}),"
                " e.g. with other stain references or seeds; pass the store directories themselves"
            )
        chosen.append(found[0])
    return chosen
