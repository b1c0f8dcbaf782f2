"""Cross-validation repeated over fold seeds, summarised in one table of every run.

With ~100 images a single 6-fold CV moves by several points when only the fold shuffling
changes, so a 1-point difference between two models means nothing unless the spread is shown.
:func:`ensemble_table` gives, for every run (single stores, fused stores, each classifier) on the
same folds, the accuracy as mean and sd over fold seeds and the sd over all folds of all seeds,
in the run's scheme and in the coarser schemes its predictions map to (a ``bach4`` model is
also read as ``bmc3`` and carcinoma-vs-not, as Rakhlin et al. report it), plus the
carcinoma-vs-not AUC.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from classifiers.evaluation.cross_validation import CVConfig, CVResult, run_cross_validation
logger = logging.getLogger(__name__)


def run_repeated_cv(dataset, config: CVConfig, seeds) -> list:
    """:func:`~classifiers.evaluation.cross_validation.run_cross_validation` once per fold seed.

    Parameters
    ----------
    dataset : CVDataset
    config : CVConfig
        Its ``seed`` is replaced by each of ``seeds`` (folds and classifiers).
    seeds : sequence of int
        Distinct seeds.

    Returns
    -------
    list of CVResult, in the order of ``seeds``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    results = []
    for seed in seeds:
        logger.info("fold seed %d (%d of %d)", seed, len(results) + 1, len(seeds))
        results.append(run_cross_validation(dataset, replace(config, seed=seed)))
    return results


def _accuracies(predictions: pd.DataFrame, grouping=None):
    """Accuracy and per-fold accuracies, in the run's classes or read through `grouping`."""
    truth, pred = predictions["truth"].to_numpy(str), predictions["prediction"].to_numpy(str)
    if grouping is not None:
        truth, pred = grouping.map(truth), grouping.map(pred)
    correct = pd.Series(np.asarray(truth) == np.asarray(pred))
    return float(correct.mean()), correct.groupby(predictions["fold"].to_numpy()).mean().to_numpy()


def _binary_grouping(dataset):
    """The first two-class grouping (carcinoma vs non-carcinoma for BACH), or the scheme itself
    when it has two classes; None otherwise."""
    for g in [*dataset.groupings, dataset.label_scheme]:
        if g is not None and len(g.classes) == 2:
            return g
    return None


def _positive_auc(predictions: pd.DataFrame, dataset) -> float:
    """AUC of the binary grouping's positive (second) class from the image-level mean
    probabilities (summed over the classes it merges)."""
    grouping = _binary_grouping(dataset)
    if grouping is None:
        return float("nan")
    positive = grouping.classes[1]
    truth = np.asarray(grouping.map(predictions["truth"].to_numpy(str))) == positive
    merged = [c for c in dataset.classes if grouping.map([c])[0] == positive]
    columns = [f"proba_{c}" for c in merged if f"proba_{c}" in predictions]
    if not columns or truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, predictions[columns].sum(axis=1)))


def ensemble_table(results: list) -> pd.DataFrame:
    """One row per run over all seeds of ``results`` (from :func:`run_repeated_cv`).

    Columns: ``run``, ``classifier``, ``fusion``, ``stores``, ``seeds``; then per scheme ``s``
    (the run's and the coarser ones) ``s_mean`` (mean over seeds of the accuracy with
    majority voting), ``s_sd_seeds`` (sd of that accuracy over seeds), ``s_sd_folds`` (sd of
    the per-fold accuracies over all folds of all seeds); ``auc_carcinoma_mean`` and
    ``auc_carcinoma_sd_seeds`` (the AUC of the positive class of the scheme's first two-class
    grouping: carcinoma for BACH, malignant for BreakHis; ``auc_<class>`` names it for other
    schemes); with patient groups (fewer groups than images), ``patient_level_mean`` and
    ``patient_level_sd_seeds``: the patient-level accuracy of Spanhol et al. (2016) in the run's
    scheme.  Sorted by the run's own-scheme accuracy, best first.
    """
    from classifiers.evaluation.patients import patient_accuracy

    if not results:
        raise ValueError("no results to tabulate")
    dataset = results[0].dataset
    scheme = dataset.scheme
    targets = [(scheme, None)] + [(g.name, g) for g in dataset.groupings if g.name != scheme]
    binary = _binary_grouping(dataset)
    auc_name = "auc_carcinoma" if binary is None or binary.classes[1] == "carcinoma" else f"auc_{binary.classes[1]}"
    rows = []
    for i, run in enumerate(results[0].runs):
        per_seed = [result.runs[i] for result in results]
        row = {"run": run.spec.name, "classifier": run.spec.classifier, "fusion": run.spec.fusion,
               "stores": "+".join(run.store_names), "seeds": len(per_seed)}
        for target, grouping in targets:
            overall, folds = zip(*(_accuracies(r.predictions, grouping) for r in per_seed))
            row[f"{target}_mean"] = float(np.mean(overall))
            row[f"{target}_sd_seeds"] = float(np.std(overall, ddof=1)) if len(overall) > 1 else float("nan")
            row[f"{target}_sd_folds"] = float(np.std(np.concatenate(folds), ddof=1))
        if dataset.images["group"].nunique() < len(dataset.images):
            scores = [patient_accuracy(r.predictions["truth"], r.predictions["prediction"], r.predictions["group"])
                      for r in per_seed]
            row["patient_level_mean"] = float(np.mean(scores))
            row["patient_level_sd_seeds"] = float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan")
        aucs = [_positive_auc(r.predictions, dataset) for r in per_seed]
        row[f"{auc_name}_mean"] = float(np.mean(aucs))
        row[f"{auc_name}_sd_seeds"] = float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).sort_values(f"{scheme}_mean", ascending=False, kind="stable").reset_index(drop=True)


def ensemble_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, each accuracy as ``mean ± sd(seeds) [sd(folds)]``, in percent."""
    schemes = [c[: -len("_mean")] for c in table.columns
               if c.endswith("_mean") and not c.startswith(("auc", "patient_level"))]
    auc = next(c[: -len("_mean")] for c in table.columns if c.startswith("auc_") and c.endswith("_mean"))
    patients = "patient_level_mean" in table.columns
    header = ["run", "stores", *schemes, *(["patient-level"] if patients else []), "AUC " + auc[len("auc_"):]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        stores = r["stores"].split("+")  # a fusion's full list is in ensemble.csv
        cells = [r["run"], stores[0] if len(stores) == 1 else f"{len(stores)} stores"]
        for s in schemes:
            cells.append(f"{100 * r[f'{s}_mean']:.1f} ± {100 * r[f'{s}_sd_seeds']:.1f} "
                         f"[{100 * r[f'{s}_sd_folds']:.1f}]")
        if patients:
            cells.append(f"{100 * r['patient_level_mean']:.1f} ± {100 * r['patient_level_sd_seeds']:.1f}")
        cells.append(f"{r[f'{auc}_mean']:.3f} ± {r[f'{auc}_sd_seeds']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_repeated_report(dataset, config: CVConfig, seeds, out_dir, command: str | None = None) -> dict:
    """Run :func:`run_repeated_cv`, write each seed's full report to ``out_dir/seed-S`` and
    the table over seeds to ``out_dir/ensemble.csv`` and ``out_dir/ensemble.md``.

    Returns
    -------
    dict
        ``{"table": DataFrame, "markdown": str, "files": list of paths}``.
    """
    from classifiers.evaluation.report import write_report

    out = Path(out_dir)
    results = run_repeated_cv(dataset, config, seeds)
    files = []
    for seed, result in zip(seeds, results):
        files += write_report(result, out / f"seed-{seed}", command=command)["files"]
    table = ensemble_table(results)
    markdown = (f"{len(results[0].dataset.images)} images, {config.n_folds}-fold grouped CV, fold seeds "
                f"{', '.join(map(str, seeds))}; accuracy in % as mean ± sd over seeds [sd over all "
                f"folds]; majority voting over augmentations\n\n" + ensemble_markdown(table))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ensemble.csv").write_text(table.to_csv(index=False), encoding="utf-8")
    (out / "ensemble.md").write_text(markdown, encoding="utf-8")
    files += [str(out / "ensemble.csv"), str(out / "ensemble.md")]
    return {"table": table, "markdown": markdown, "files": files}
