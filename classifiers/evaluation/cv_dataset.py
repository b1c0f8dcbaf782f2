"""Turn one or more feature stores into one aligned, validated data set.

Every check that can fail on the input is done here, before any training:
store shapes, duplicate rows, one label and one group per image, stores
covering the same (image, augmentation) rows, the label scheme mapping, and at
least two classes.  Fold feasibility (enough groups per class) is checked in
:mod:`classifiers.evaluation.folds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

REQUIRED_META_COLUMNS = ("image_id", "label", "group", "aug")
#: Per-image columns kept when a store has them (BreakHis magnification, content hash; the path
#: and why Macenko was not applied, for the report's gallery and Methods).
OPTIONAL_META_COLUMNS = ("magnification", "source_sha256", "path", "stain_note")
#: How many differing ids an error message lists before eliding the rest.
_MAX_LISTED = 10


class InputDataError(ValueError):
    """Input that cannot be cross-validated; the message says what to do."""


@dataclass
class CVDataset:
    """Feature rows of one or more stores, aligned on ``(image_id, aug)``.

    Attributes
    ----------
    meta : pandas.DataFrame
        One row per (image, augmentation), sorted by ``(image_id, aug)``;
        columns ``image_id``, ``aug``, ``group``, ``source_label`` (label as
        stored) and ``label`` (mapped to ``scheme``).
    X : list of ndarray
        One float32 matrix per store, rows aligned with ``meta``.
    store_names : list of str
        Short unique name per store (backbone, de-duplicated).
    images : pandas.DataFrame
        One row per image (sorted by ``image_id``): ``image_id``, ``label``,
        ``group``, ``n_aug``, and ``magnification`` when the store records one; ``path`` and
        ``stain_note`` (why Macenko was not applied, else empty) when the first store records them.
    row_image : ndarray of int
        Index into ``images`` for every row of ``meta``.
    classes : tuple of str
        Classes of ``scheme`` present in the data, in scheme order.
    scheme : str
        Name of the label scheme the data are reported in (``bach4``, ``classes``, a
        mapping file's stem...).
    absent_classes : tuple of str
        Classes of ``scheme`` with no image (reported, not modelled).
    store_configs : list of dict
        The extraction config of every store.
    label_scheme : data.mapping.LabelScheme
        The scheme itself (classes and the mapping from stored labels).
    groupings : list of data.mapping.LabelScheme
        Coarser schemes the classes map into, for report-time regrouping (bach4 -> bmc3,
        binary; mapping files given as ``regroup``).
    duplicates : list of list of str
        Image ids of identical files (same ``source_sha256``), one list per content.
    instances : list
        Per store, its bags ``(n_rows, n_instances, n_features)`` float32 aligned with ``meta``
        (an instance store), else ``None``; what the ``mil`` classifier takes.
    """

    meta: pd.DataFrame
    X: list
    store_names: list
    images: pd.DataFrame
    row_image: np.ndarray
    classes: tuple
    scheme: str
    absent_classes: tuple = ()
    store_configs: list = field(default_factory=list)
    label_scheme: object = None
    groupings: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)
    instances: list = field(default_factory=list)

    def __post_init__(self):
        if self.label_scheme is None:
            from data.mapping import builtin_scheme, groupings

            self.label_scheme = builtin_scheme(self.scheme)
            self.groupings = self.groupings or groupings(self.label_scheme)

    @property
    def row_labels(self) -> np.ndarray:
        """Mapped label of every row."""
        return self.meta["label"].to_numpy()


def short_list(values) -> str:
    values = sorted(map(str, values))
    shown = ", ".join(values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _describe(config: dict) -> str:
    """What sets a store apart from another of the same backbone: mode, scale, crops, pooling."""
    parts = [str(config.get("mode", "exact")), f"s{config.get('scale')}"]
    if config.get("mode", "exact") != "whole":
        parts.append(f"{config.get('crops')}x{config.get('crop_size')}")
        if config.get("pooling", "mean") != "mean":
            parts.append(str(config["pooling"]))
    if config.get("instances", "none") != "none":
        parts.append(str(config["instances"]))
    return "-".join(parts)


def _store_names(configs: list) -> list:
    """Short unique names: the backbone, then what differs between its stores, then a hash."""
    bases = [str((c or {}).get("backbone") or f"store{i}") for i, c in enumerate(configs)]
    names = []
    for i, config in enumerate(configs):
        config = config or {}
        name = bases[i]
        if bases.count(name) > 1 and "scale" in config:
            name = f"{name}-{_describe(config)}"
        if name in names:
            tag = str(config.get("config_hash") or "")[:8]
            name = f"{name}-{tag}" if tag and f"{name}-{tag}" not in names else f"{name}-{i}"
        names.append(name)
    return names


def _validated_frame(table, name: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """Check one FeatureTable and return its meta, X and instances (``None`` when it has none)
    sorted by (image_id, aug)."""
    meta, X = table.meta, np.asarray(table.X)
    missing = [c for c in REQUIRED_META_COLUMNS if c not in meta.columns]
    if missing:
        raise InputDataError(f"store {name!r}: meta lacks columns {missing}; it needs {list(REQUIRED_META_COLUMNS)}")
    if X.ndim != 2 or X.shape[0] != len(meta):
        raise InputDataError(
            f"store {name!r}: X has shape {X.shape} but meta has {len(meta)} rows; "
            "the store is corrupt, re-run the feature extraction"
        )
    if len(meta) == 0:
        raise InputDataError(f"store {name!r} is empty; re-run the feature extraction on a non-empty manifest")
    if not np.all(np.isfinite(X)):
        bad = meta.loc[~np.isfinite(X).all(axis=1), "image_id"].unique()
        raise InputDataError(
            f"store {name!r}: non-finite features for images {short_list(bad)}; re-extract those images"
        )
    meta = meta.loc[:, list(REQUIRED_META_COLUMNS) + [c for c in OPTIONAL_META_COLUMNS if c in meta.columns]].copy()
    meta["image_id"] = meta["image_id"].astype(str)
    meta["group"] = meta["group"].astype(str)
    meta["label"] = meta["label"].astype(str)
    meta["aug"] = meta["aug"].astype(int)
    dup = meta.duplicated(["image_id", "aug"])
    if dup.any():
        raise InputDataError(
            f"store {name!r}: duplicate (image_id, aug) rows for images {short_list(meta.loc[dup, 'image_id'].unique())}"
        )
    per_image = meta.groupby("image_id")[["label", "group"]].nunique()
    for column in ("label", "group"):
        bad = per_image.index[per_image[column] > 1]
        if len(bad):
            raise InputDataError(
                f"store {name!r}: images with more than one {column} across augmentations: {short_list(bad)}; "
                "fix the manifest and re-extract"
            )
    order = np.lexsort((meta["aug"].to_numpy(), meta["image_id"].to_numpy()))
    instances = getattr(table, "instances", None)
    if instances is not None:
        instances = np.asarray(instances)
        if instances.ndim != 3 or instances.shape[0] != len(meta) or instances.shape[2] != X.shape[1]:
            raise InputDataError(f"store {name!r}: instances have shape {instances.shape} for {X.shape} features; "
                                 "the store is corrupt, re-run the feature extraction")
        instances = np.ascontiguousarray(instances[order], dtype=np.float32)
    return meta.iloc[order].reset_index(drop=True), X[order], instances


def _check_same_rows(metas: list, names: list) -> None:
    """Raise if the stores do not hold the same (image_id, aug) rows, labels, groups."""
    ref, ref_name = metas[0], names[0]
    ref_images = set(ref["image_id"])
    for meta, name in zip(metas[1:], names[1:]):
        images = set(meta["image_id"])
        if images != ref_images:
            only_ref, only_other = ref_images - images, images - ref_images
            parts = []
            if only_ref:
                parts.append(f"{len(only_ref)} image(s) only in {ref_name!r}: {short_list(only_ref)}")
            if only_other:
                parts.append(f"{len(only_other)} image(s) only in {name!r}: {short_list(only_other)}")
            raise InputDataError(
                f"stores {ref_name!r} and {name!r} do not cover the same images: " + "; ".join(parts)
                + ". Extract every backbone from the same manifest (same images, same augmentation "
                "count) or pass only stores that match."
            )
        keys_ref = ref[["image_id", "aug"]].to_numpy()
        keys = meta[["image_id", "aug"]].to_numpy()
        if len(keys) != len(keys_ref) or not (keys == keys_ref).all():
            n_ref = ref.groupby("image_id").size()
            n_other = meta.groupby("image_id").size()
            differ = n_ref.index[(n_ref != n_other.reindex(n_ref.index)).to_numpy()]
            if len(differ) == 0:  # same counts, different aug indices
                merged = ref.merge(meta, on=["image_id", "aug"], how="outer", indicator=True)
                differ = merged.loc[merged["_merge"] != "both", "image_id"].unique()
            raise InputDataError(
                f"stores {ref_name!r} and {name!r} hold different augmentations for images {short_list(differ)}. "
                "Extract both stores with the same augmentation count and seed."
            )
        for column in ("label", "group"):
            diff = ref[column].to_numpy() != meta[column].to_numpy()
            if diff.any():
                raise InputDataError(
                    f"stores {ref_name!r} and {name!r} disagree on the {column} of images "
                    f"{short_list(ref.loc[diff, 'image_id'].unique())}; extract them from the same manifest"
                )


def resolve_label_scheme(labels, scheme):
    """The :class:`data.mapping.LabelScheme` that ``--labels scheme`` means for stored `labels`."""
    from data.mapping import resolve_scheme

    try:
        return resolve_scheme(scheme, np.asarray(labels, dtype=str), where="the store(s)")
    except ValueError as exc:
        raise InputDataError(
            f"the stored labels cannot be reported in scheme {getattr(scheme, 'name', scheme)!r}: {exc}. "
            "Choose a scheme the stored labels map into: auto (the default), classes (as found), a built-in "
            "scheme (bach4 labels map to bach4, bmc3 and binary) or a mapping file."
        ) from exc


def map_to_scheme(labels, scheme) -> tuple[np.ndarray, tuple]:
    """Map stored labels into ``scheme`` (a name, ``auto``, ``classes``, a mapping file or a
    :class:`data.mapping.LabelScheme`).

    Returns
    -------
    mapped : ndarray of str
    scheme_classes : tuple of str
        All classes of the scheme, in order.
    """
    label_scheme = resolve_label_scheme(labels, scheme)
    return np.asarray(label_scheme.map(np.asarray(labels, dtype=str)), dtype=str), tuple(label_scheme.classes)


def regroupings(label_scheme, regroup=()) -> list:
    """Coarser schemes for report-time regrouping: the built-in ones the classes map into, then
    each mapping file of `regroup`, which must map every class."""
    from data.mapping import groupings, load_mapping

    extra = []
    for item in regroup:
        mapping = item if hasattr(item, "classes") else load_mapping(item)
        missing = mapping.accepts(label_scheme.classes)
        if missing:
            raise InputDataError(f"{mapping.describe()} does not map class(es) {', '.join(map(repr, missing))} of "
                                 f"the run's scheme {label_scheme.name!r} ({', '.join(label_scheme.classes)})")
        extra.append(mapping)
    return groupings(label_scheme, extra)


def _duplicates(meta: pd.DataFrame) -> list:
    if "source_sha256" not in meta.columns:
        return []
    per_image = meta.drop_duplicates("image_id")
    per_image = per_image[per_image["source_sha256"].astype(str) != ""]
    sets = per_image.groupby("source_sha256")["image_id"].apply(sorted)
    return sorted(ids for ids in sets if len(ids) > 1)


def at_magnification(table, magnification, name: str = "store"):
    """The rows of a feature table at the given magnification(s) (``40``, ``"100x"``, a list).

    Raises
    ------
    InputDataError
        If the store records no magnification, or a requested one is not in it.
    """
    from data.datasets import select_magnification

    meta = table.meta
    per_image = pd.DataFrame({"image_id": meta["image_id"].astype(str),
                              "magnification": meta["magnification"].astype(str) if "magnification" in meta
                              else ""}).drop_duplicates("image_id")
    try:
        kept = set(select_magnification(per_image, magnification, where=f"store {name!r}")["image_id"])
    except ValueError as exc:
        raise InputDataError(str(exc)) from None
    rows = meta["image_id"].astype(str).isin(kept).to_numpy()
    return _with_rows(table, rows)


def with_breakhis_patients(table, grouping: str):
    """A feature table whose BreakHis-named images get their patient under `grouping`
    (``number`` or ``slide``, :data:`data.breakhis.PATIENT_GROUPINGS`), copies of one image
    (same ``source_sha256``) joined again; other images keep their group."""
    from data.breakhis import is_breakhis_like, parse_name
    from data.duplicates import join_groups

    meta = table.meta.copy()
    per_image = meta.drop_duplicates("image_id").reset_index(drop=True)
    groups = []
    for image_id, group in zip(per_image["image_id"].astype(str), per_image["group"].astype(str)):
        name = image_id.rsplit("/", 1)[-1]
        groups.append(parse_name(name).patient(grouping) if is_breakhis_like(name) else group)
    if "source_sha256" in per_image.columns:
        sha = per_image["source_sha256"].astype(str)
        sets = [list(idx) for digest, idx in per_image.groupby(sha).indices.items() if digest and len(idx) > 1]
        groups = join_groups(groups, sets)
    meta["group"] = meta["image_id"].astype(str).map(dict(zip(per_image["image_id"].astype(str), groups)))
    return _with_rows(table, np.arange(len(meta)), meta)


def _with_rows(table, rows, meta=None):
    """``table`` (a FeatureTable or alike) with ``rows`` and their instances, if any; ``meta``
    replaces the selected meta."""
    meta = table.meta[rows].reset_index(drop=True) if meta is None else meta
    instances = getattr(table, "instances", None)
    extra = {} if instances is None else {"instances": np.asarray(instances)[rows]}
    return type(table)(meta=meta, X=np.asarray(table.X)[rows], config=table.config, **extra)


def build_dataset(tables, scheme="auto", names=None, regroup=(), magnification=None,
                  breakhis_patients=None) -> CVDataset:
    """Validate and align feature tables, and map their labels to ``scheme``.

    Parameters
    ----------
    tables : sequence of features.store.FeatureTable
        One or more stores of the same images (e.g. different backbones).
    scheme : str or data.mapping.LabelScheme
        Label scheme to report in: ``auto`` (a built-in scheme for BACH / BreakHis labels, else
        the classes as found), ``classes``, ``bach4``, ``bmc3``, ``binary``, ``breakhis2``,
        ``breakhis8``, or a mapping file (:mod:`data.mapping`).
    names : sequence of str, optional
        Names of the stores; default from each config's ``backbone``.
    regroup : sequence of path or LabelScheme
        Mapping files of coarser schemes to report too (next to the built-in ones).
    magnification : str, int or list, optional
        Keep only the images of these magnifications (:func:`at_magnification`).
    breakhis_patients : {'number', 'slide'}, optional
        Regroup BreakHis-named images into patients this way (:func:`with_breakhis_patients`);
        default: the groups stored at extraction.

    Returns
    -------
    CVDataset

    Raises
    ------
    InputDataError
        If a store is malformed, the stores do not cover the same rows, the
        labels cannot be mapped, or fewer than two classes are present.
    """
    tables = list(tables)
    if not tables:
        raise InputDataError("no feature store given; pass at least one in `stores`")
    configs = [dict(getattr(t, "config", None) or {}) for t in tables]
    names = list(names) if names is not None else _store_names(configs)
    if len(names) != len(tables) or len(set(names)) != len(names):
        raise InputDataError(f"store names must be unique, one per store: {names}")
    if magnification is not None:
        tables = [at_magnification(t, magnification, n) for t, n in zip(tables, names)]
    if breakhis_patients is not None:
        tables = [with_breakhis_patients(t, breakhis_patients) for t in tables]
    frames = [_validated_frame(t, n) for t, n in zip(tables, names)]
    metas, Xs = [f[0] for f in frames], [np.ascontiguousarray(f[1], dtype=np.float32) for f in frames]
    instances = [f[2] for f in frames]
    _check_same_rows(metas, names)

    meta = metas[0].rename(columns={"label": "source_label"})
    # One label per image (not per augmentation row), so that messages count images.
    label_scheme = resolve_label_scheme(meta.drop_duplicates("image_id")["source_label"].to_numpy(), scheme)
    mapped = np.asarray(label_scheme.map(meta["source_label"].to_numpy(dtype=str)), dtype=str)
    scheme_classes, scheme = tuple(label_scheme.classes), label_scheme.name
    meta["label"] = mapped
    present = tuple(c for c in scheme_classes if c in set(mapped))
    unknown = sorted(set(mapped) - set(scheme_classes))
    if unknown:
        raise InputDataError(f"labels {unknown} are not classes of scheme {scheme!r} {scheme_classes}")
    if len(present) < 2:
        raise InputDataError(
            f"the store(s) hold only one class ({', '.join(present)}) in scheme {scheme!r} "
            f"({meta['image_id'].nunique()} images): classification needs at least two classes. "
            "Extract features from a manifest with images of several classes."
        )
    per_image = {"label": ("label", "first"), "group": ("group", "first"), "n_aug": ("aug", "size")}
    if "magnification" in meta.columns and (meta["magnification"].astype(str) != "").any():
        per_image["magnification"] = ("magnification", "first")
    if "stain_note" in meta.columns:
        meta["stain_note"] = meta["stain_note"].fillna("").astype(str)
    per_image.update({c: (c, "first") for c in ("path", "stain_note") if c in meta.columns})
    images = meta.groupby("image_id", sort=True).agg(**per_image).reset_index()
    row_image = images.index.to_numpy()[
        pd.Index(images["image_id"]).get_indexer(meta["image_id"])
    ]
    return CVDataset(
        meta=meta,
        X=Xs,
        store_names=names,
        images=images,
        row_image=row_image,
        classes=present,
        scheme=scheme,
        absent_classes=tuple(c for c in scheme_classes if c not in present),
        store_configs=configs,
        label_scheme=label_scheme,
        groupings=regroupings(label_scheme, regroup),
        duplicates=_duplicates(meta),
        instances=instances if any(i is not None for i in instances) else [],
    )
