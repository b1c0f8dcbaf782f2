"""Report files of a cross-validated evaluation: tables, pictures, HTML.

Layout of the report directory::

    metrics.json          config, stores, device, folds summary, all metrics
    predictions.csv       per image and run: truth, predictions, fold, votes, mean probabilities
    folds.csv             fold of every image (image_id, group, label, fold)
    fold_accuracy.csv     per-fold accuracy (rows = folds, columns = runs), mean and sd rows
    summary.csv           one line per run: accuracies, fold mean +- sd, macro AUC
    tuning.csv            with CVConfig.tune: hyper-parameters chosen per run, fold and store
    <run>/confusion.csv   counts, rows = truth, columns = prediction (majority vote)
    <run>/confusion_mean_proba.csv   same for mean-probability voting
    <run>/confusion.png
    <run>/per_class.csv   precision, recall (sensitivity), specificity, F1, support
    <run>/binary_table.csv
    <run>/magnification.csv  image- and patient-level accuracy per magnification (when images have one)
    <run>/levels.csv      accuracy in each coarser grouping of the scheme (bmc3, binary, --regroup files)
    <run>/roc.png         one-vs-rest ROC per class from image-level mean probabilities
    report.html           all of the above in one self-contained page

Pictures use matplotlib's Agg canvas directly (no pyplot, no global backend).
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from classifiers.evaluation.cross_validation import CVResult
from classifiers.evaluation.metrics import METRIC_CONVENTIONS, roc_per_class, run_metrics
from classifiers.evaluation import report_levels
from data.files import software_versions


def summarize(result: CVResult) -> dict:
    """Everything that goes into ``metrics.json``."""
    dataset, config = result.dataset, result.config
    runs = {}
    for run in result.runs:
        row_pred = np.asarray(dataset.classes)[np.argmax(run.row_proba, axis=1)]
        # Runs whose rows are not the stores' rows (two-stage views) carry their own labels.
        row_labels = getattr(run, "row_labels", None)
        row_acc = float(np.mean(row_pred == (dataset.row_labels if row_labels is None else row_labels)))
        runs[run.spec.name] = {
            "classifier": run.spec.classifier,
            "fusion": run.spec.fusion,
            "stores": list(run.store_names),
            "chosen_params": list(getattr(run, "chosen_params", [])),
            **run_metrics(run.predictions, dataset.classes, dataset.scheme, row_accuracy=row_acc,
                          groupings=getattr(dataset, "groupings", None)),
        }
    folds = result.folds
    extra = {"two_stage": result.two_stage} if getattr(result, "two_stage", None) else {}
    return {
        "config": {
            "scheme": config.scheme,
            "n_folds": config.n_folds,
            "classifiers": list(config.classifiers),
            "fusion": list(config.fusion),
            "seed": config.seed,
            "n_jobs": config.n_jobs,
            "device_requested": config.device,
            "tune": bool(getattr(config, "tune", False)),
        },
        "device": None if result.device is None else {"xgboost": result.device.device, "reason": result.device.reason},
        "stores": [
            {
                "name": name,
                "backbone": cfg.get("backbone"),
                "config_hash": cfg.get("config_hash"),
                "n_features": int(X.shape[1]),
                "versions": cfg.get("versions", {}),  # of the machine that extracted the store
            }
            for name, cfg, X in zip(dataset.store_names, dataset.store_configs, dataset.X)
        ],
        "classes": list(dataset.classes),
        "versions": software_versions(),  # of the machine that ran the cross-validation
        "absent_classes": list(dataset.absent_classes),
        "n_images": int(len(dataset.images)),
        "n_rows": int(len(dataset.meta)),
        "n_groups": int(dataset.images["group"].nunique()),
        "images_per_class": {c: int((dataset.images["label"] == c).sum()) for c in dataset.classes},
        "folds": {
            "file": "folds.csv",
            "images_per_fold": {int(k): int(v) for k, v in folds["fold"].value_counts().sort_index().items()},
            "images_per_fold_and_class": {
                int(k): {str(c): int(n) for c, n in g["label"].value_counts().items()}
                for k, g in folds.groupby("fold")
            },
        },
        "conventions": METRIC_CONVENTIONS,
        **report_levels.dataset_summary(dataset),
        "runs": runs,
        "seconds": round(result.seconds, 2),
        "environment": {"python": platform.python_version()},
        **extra,
    }


def _figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def confusion_png(counts, classes, title: str) -> bytes:
    """Confusion-matrix picture (counts; rows truth, columns prediction)."""
    counts = np.asarray(counts)
    size = 1.2 + 0.9 * len(classes)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    return _figure_png(fig)


def roc_png(predictions: pd.DataFrame, classes, title: str) -> bytes:
    """One-vs-rest ROC curves per class from the image-level mean probabilities."""
    roc = roc_per_class(
        predictions["truth"].to_numpy(dtype=str), predictions[[f"proba_{c}" for c in classes]].to_numpy(), classes
    )
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    for c, (fpr, tpr) in roc["curves"].items():
        ax.plot(fpr, tpr, label=f"{c} (AUC {roc['auc'][c]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"{title}\nmacro AUC {roc['macro_auc']:.3f}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    return _figure_png(fig)


def _confusion_frame(confusion: dict) -> pd.DataFrame:
    labels = confusion["labels"]
    return pd.DataFrame(confusion["counts"], index=pd.Index(labels, name="truth"),
                        columns=pd.Index(labels, name="predicted"))


def _fold_table(summary: dict) -> pd.DataFrame:
    table = pd.DataFrame(
        {name: pd.Series({int(k): v for k, v in r["majority"]["fold_accuracy"].items()}) for name, r in summary["runs"].items()}
    )
    table.index.name = "fold"
    table = table.sort_index()
    table.loc["mean"] = [summary["runs"][n]["majority"]["fold_accuracy_mean"] for n in table.columns]
    table.loc["sd"] = [summary["runs"][n]["majority"]["fold_accuracy_sd"] for n in table.columns]
    return table


def _summary_table(summary: dict) -> pd.DataFrame:
    rows = []
    for name, r in summary["runs"].items():
        rows.append(
            {
                "run": name,
                "classifier": r["classifier"],
                "fusion": r["fusion"],
                "stores": "+".join(r["stores"]),
                "accuracy_majority": r["majority"]["accuracy"],
                "fold_mean": r["majority"]["fold_accuracy_mean"],
                "fold_sd": r["majority"]["fold_accuracy_sd"],
                "accuracy_mean_proba": r["mean_proba"]["accuracy"],
                "balanced_accuracy": r["majority"]["balanced_accuracy"],
                "macro_auc": r["roc_auc"]["macro"],
                "row_accuracy": r["row_accuracy"],
            }
        )
    return pd.DataFrame(rows)


def _tuning_table(summary: dict) -> pd.DataFrame:
    """One line per run, fold and store: the inner-CV choice (empty without tuning)."""
    rows = [{"run": name, **p} for name, r in summary["runs"].items() for p in r.get("chosen_params", [])]
    return pd.DataFrame(rows)


def _fmt(value) -> str:
    """Three decimals; JSON null (undefined) as n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def _html_table(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_html(index=index, float_format=lambda v: f"{v:.3f}", na_rep="n/a", border=0, classes="t")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table.t{border-collapse:collapse;margin:0.5em 0 1em}
table.t th,table.t td{border:1px solid #ccc;padding:2px 8px;text-align:right}
table.t th{background:#f0f0f0}
h2{border-bottom:1px solid #999;margin-top:2em}
.pics img{margin-right:1em;vertical-align:top}
.note{color:#555;font-size:90%}
"""


def _html(summary: dict, pictures: dict) -> str:
    esc = html.escape
    cfg = summary["config"]
    device = summary["device"]
    stores = pd.DataFrame(summary["stores"])
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Cross-validation report ({esc(cfg['scheme'])})</title><style>{_CSS}</style></head><body>",
        f"<h1>Cross-validation report: {esc(cfg['scheme'])} scheme</h1>",
        f"<p>{summary['n_images']} images ({summary['n_rows']} augmented rows, {summary['n_groups']} groups), "
        f"classes {esc(', '.join(summary['classes']))}"
        + (f" (absent: {esc(', '.join(summary['absent_classes']))})" if summary["absent_classes"] else "")
        + f"; {cfg['n_folds']}-fold StratifiedGroupKFold, seed {cfg['seed']}; "
        + (f"XGBoost device: <b>{esc(device['xgboost'])}</b> ({esc(device['reason'])}); " if device else "")
        + f"{summary['seconds']:.1f} s.</p>",
        *report_levels.dataset_html(summary),
        "<h3>Stores</h3>",
        _html_table(stores),
        "<h3>Images per class</h3>",
        _html_table(pd.DataFrame([summary["images_per_class"]])),
        "<h2>Summary</h2>",
        _html_table(_summary_table(summary)),
        "<p class='note'>accuracy_majority: majority voting over each image's augmentations; "
        "fold_mean/fold_sd: mean and sample sd (ddof=1) of the per-fold accuracies; "
        "accuracy_mean_proba: mean-probability voting; row_accuracy: single augmentations before voting.</p>",
        "<h2>Per-fold accuracy (majority voting)</h2>",
        _html_table(_fold_table(summary), index=True),
    ]
    tuning = _tuning_table(summary)
    if len(tuning):
        parts += [
            "<h2>Hyper-parameters chosen by inner CV</h2>",
            "<p class='note'>Per outer fold, a grouped 3-fold CV of the training rows only chose "
            "among the candidates of classifiers.feature.tuning.PARAM_GRIDS (row accuracy).</p>",
            _html_table(tuning),
        ]
    if "two_stage" in summary:
        info = summary["two_stage"]
        parts += [
            "<h2>Two-stage CNN (Nazeri et al. 2018)</h2>",
            "<p class='note'>Both networks trained from scratch inside each training fold. Runs: two_stage "
            "(single pass), two_stage_ensemble (8 rotations/flips; majority = vote of the views, mean "
            "probability = the paper's rule), patch_majority / patch_max / patch_sum (patch-fusion "
            f"baselines, single pass). Stain reference: {esc(str(info['stain_reference']))}; "
            f"{info['seconds']:.0f} s.</p>",
            _html_table(pd.DataFrame(info["folds"])),
            f"<pre>{esc(json.dumps(info['config'], indent=1))}</pre>",
        ]
    for name, r in summary["runs"].items():
        maj = r["majority"]
        parts += [
            f"<h2>Run {esc(name)}</h2>",
            f"<p>classifier {esc(r['classifier'])}, fusion {esc(r['fusion'])}, stores {esc(' + '.join(r['stores']))}; "
            f"accuracy {maj['accuracy']:.3f} (majority), {r['mean_proba']['accuracy']:.3f} (mean probability); "
            f"folds {maj['fold_accuracy_mean']:.3f} &plusmn; {_fmt(maj['fold_accuracy_sd'])}.</p>",
            *report_levels.run_html(r, summary["n_images"]),
            "<h3>Confusion matrix (majority voting; rows truth, columns predicted)</h3>",
            _html_table(_confusion_frame(maj["confusion"]), index=True),
            "<h3>Per class</h3>",
            _html_table(pd.DataFrame(maj["per_class"])),
            "<h3>Binary comparisons (El Agouri et al. 2022, Table 1)</h3>",
            _html_table(pd.DataFrame(maj["binary_table"])),
            "<h3>Confusion matrix (mean-probability voting)</h3>",
            _html_table(_confusion_frame(r["mean_proba"]["confusion"]), index=True),
            "<div class='pics'>",
            _img(pictures[name]["confusion"], f"confusion matrix {name}"),
            _img(pictures[name]["roc"], f"ROC {name}"),
            "</div>",
            "<p>AUC (one-vs-rest, image-level mean probabilities): "
            + ", ".join(f"{esc(c)} {_fmt(v)}" for c, v in r["roc_auc"]["per_class"].items())
            + f"; macro {_fmt(r['roc_auc']['macro'])}.</p>",
        ]
    parts += ["<h2>Conventions</h2><ul>"]
    parts += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in summary["conventions"].items()]
    parts += ["</ul>", "<p class='note'>Fold of every image: folds.csv; per-image predictions: predictions.csv.</p>",
              "</body></html>"]
    return "\n".join(parts)


def run_directory(name: str) -> str:
    """File-system safe directory name of a run (run names come from store names)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def write_report(result: CVResult, out_dir) -> dict:
    """Write all report files into ``out_dir`` (created if needed).

    Parameters
    ----------
    result : CVResult
    out_dir : str or Path

    Returns
    -------
    dict
        ``{"summary": metrics dict, "files": list of written paths}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    written = []

    def save(path: Path, content) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        written.append(path)

    save(out / "metrics.json", json.dumps(summary, indent=2, allow_nan=False))
    save(out / "predictions.csv", pd.concat([r.predictions for r in result.runs]).to_csv(index=False))
    save(out / "folds.csv", result.folds.to_csv(index=False))
    save(out / "fold_accuracy.csv", _fold_table(summary).to_csv())
    save(out / "summary.csv", _summary_table(summary).to_csv(index=False))
    if summary["config"]["tune"]:
        save(out / "tuning.csv", _tuning_table(summary).to_csv(index=False))

    pictures = {}
    classes = list(result.dataset.classes)
    for run in result.runs:
        name, r = run.spec.name, summary["runs"][run.spec.name]
        run_dir = out / run_directory(name)
        maj = r["majority"]
        save(run_dir / "confusion.csv", _confusion_frame(maj["confusion"]).to_csv())
        save(run_dir / "confusion_mean_proba.csv", _confusion_frame(r["mean_proba"]["confusion"]).to_csv())
        save(run_dir / "per_class.csv", pd.DataFrame(maj["per_class"]).to_csv(index=False))
        save(run_dir / "binary_table.csv", pd.DataFrame(maj["binary_table"]).to_csv(index=False))
        for file_name, table in report_levels.run_tables(r).items():
            save(run_dir / file_name, table.to_csv(index=False))
        pictures[name] = {
            "confusion": confusion_png(maj["confusion"]["counts"], classes, f"{name}: majority voting"),
            "roc": roc_png(run.predictions, classes, f"{name}: one-vs-rest ROC"),
        }
        save(run_dir / "confusion.png", pictures[name]["confusion"])
        save(run_dir / "roc.png", pictures[name]["roc"])
    save(out / "report.html", _html(summary, pictures))
    return {"summary": summary, "files": [str(p) for p in written]}
