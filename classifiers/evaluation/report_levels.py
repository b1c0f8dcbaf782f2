"""Report sections for any data set: scheme and groupings, duplicates, patient-level accuracy,
per-magnification results and the regrouped (coarser-level) accuracies.

Kept apart from :mod:`classifiers.evaluation.report` so that each section is one small function:
``report.summarize`` calls :func:`dataset_summary`, ``report._html`` calls :func:`dataset_html`
and :func:`run_html`, ``report.write_report`` writes :func:`run_tables`.
"""

from __future__ import annotations

import html

import pandas as pd

from data.labels import display_name

__all__ = ["dataset_html", "dataset_summary", "run_html", "run_tables"]


def dataset_summary(dataset) -> dict:
    """``metrics.json`` entries of the data set: its scheme, groupings and duplicate images."""
    scheme = getattr(dataset, "label_scheme", None)
    return {
        "label_scheme": scheme.to_dict() if scheme is not None else None,
        "groupings": [g.to_dict() for g in getattr(dataset, "groupings", [])],
        "duplicates": [list(ids) for ids in getattr(dataset, "duplicates", [])],
    }


def _table(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_html(index=index, float_format=lambda v: f"{v:.3f}", na_rep="n/a", border=0, classes="t")


def dataset_html(summary: dict) -> list:
    """HTML parts: where the classes come from, the groupings, the duplicates."""
    esc = html.escape
    parts = []
    scheme = summary.get("label_scheme")
    if scheme:
        mapping = scheme.get("mapping") or {}
        source = {"built-in": "built-in scheme", "as found": "the classes as found"}.get(scheme["source"],
                                                                                        f"mapping file {scheme['source']}")
        parts.append(f"<p>Classes: {esc(', '.join(map(display_name, scheme['classes'])))} ({esc(source)}"
                     + (f"; merged: {esc('; '.join(f'{k} -> {v}' for k, v in mapping.items()))}" if mapping and
                        scheme["source"] != "built-in" else "") + ").</p>")
    if summary.get("groupings"):
        parts.append("<p>Also reported in the coarser groupings: "
                     + "; ".join(f"{esc(g['name'])} ({esc(', '.join(map(display_name, g['classes'])))})" for g in summary["groupings"])
                     + ".</p>")
    duplicates = summary.get("duplicates") or []
    if duplicates:
        parts += ["<h3>Duplicate images</h3>",
                  f"<p class='note'>{len(duplicates)} image(s) are present more than once (same file content); "
                  "each set of copies was kept in one group, so no copy is on both sides of a fold.</p>",
                  "<ul>" + "".join(f"<li>{esc(' = '.join(ids))}</li>" for ids in duplicates) + "</ul>"]
    return parts


def run_tables(run: dict) -> dict:
    """Per-run CSV tables: ``patients.csv``-like summaries keyed by file name (majority voting)."""
    maj = run["majority"]
    tables = {}
    if maj.get("magnification"):
        tables["magnification.csv"] = pd.DataFrame(maj["magnification"])
    if maj.get("levels"):
        tables["levels.csv"] = pd.DataFrame([{"level": name, "classes": ", ".join(v["classes"]),
                                              "accuracy": v["accuracy"]} for name, v in maj["levels"].items()])
    return tables


def run_html(run: dict, n_images: int) -> list:
    """HTML parts of one run: patient-level accuracy, per magnification, coarser levels."""
    maj = run["majority"]
    parts = []
    n_patients = maj.get("n_patients")
    if n_patients is not None and n_patients < n_images:
        value = maj.get("patient_accuracy")
        parts.append(f"<p>Patient-level accuracy (mean over {n_patients} patients of each patient's image "
                     f"accuracy, Spanhol et al. 2016): <b>{'n/a' if value is None else f'{value:.3f}'}</b>; "
                     f"image-level accuracy {maj['accuracy']:.3f}.</p>")
    if maj.get("magnification"):
        parts += ["<h3>Per magnification (majority voting)</h3>", _table(pd.DataFrame(maj["magnification"]))]
    if maj.get("levels"):
        parts += ["<h3>Coarser groupings (majority voting)</h3>", _table(run_tables(run)["levels.csv"])]
    return parts
