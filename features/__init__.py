"""Deep features of histology images: stain normalisation, colour augmentations, crops, backbones.

The public API (imported on first use, so ``import features.config`` stays light)::

    from features import extract_features
    summary = extract_features("images/", "runs/features", augmentations=2, crops=2)
    summary.store_path  # then classifiers.cross_validate([summary.store_path])

:func:`~features.extract.extract_features` (images -> store), :func:`~features.extract.resolve_config`
(options -> :class:`~features.config.ExtractionConfig`), :func:`~features.store.load_store`,
:func:`~features.backbones.backbone_names`.
"""

_API = {
    "extract_features": "features.extract",
    "resolve_config": "features.extract",
    "ExtractionConfig": "features.config",
    "load_store": "features.store",
    "backbone_names": "features.backbones",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'features' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
