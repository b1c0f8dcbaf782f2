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
    <run>/roc_groupings.png   ROC of carcinoma vs non-carcinoma and of each pair of classes
                          (schemes with more than two classes)
    <run>/calibration.png reliability of the mean probabilities (top label)
    <run>/errors.csv      misclassified images, most confident first (the report's gallery)
    methods.txt           the ready-to-paste Methods paragraph
    report.html           all of the above in one self-contained page, with the Methods, 95 %
                          confidence intervals and thumbnails of the misclassified images

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
from matplotlib.ticker import MaxNLocator

from classifiers.evaluation.cross_validation import CVResult
from classifiers.evaluation import report_levels
from classifiers.evaluation.gallery import misclassified, thumbnail_jpeg
from classifiers.evaluation.methods import describe_methods, methods_paragraph, two_stage_training_words
from classifiers.evaluation.metrics import (
    BOOTSTRAP_RESAMPLES, METRIC_CONVENTIONS, grouping_roc, grouping_to_binary, reliability, roc_per_class, run_metrics,
)
from data.files import software_versions
from data.labels import display_name as human


def summarize(result: CVResult, command: str | None = None) -> dict:
    """Everything that goes into ``metrics.json``; ``command`` is the command line to state in
    the Methods (``None``: the report was made from Python)."""
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
    methods = describe_methods(result, command)
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
        "environment": {**software_versions(), "platform": platform.platform()},
        "methods": methods,
        "methods_paragraph": methods_paragraph(methods),
        **extra,
    }


def _figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def confusion_png(counts, classes, title: str) -> bytes:
    """Confusion-matrix picture (counts; rows truth, columns prediction)."""
    return _figure_png(confusion_figure(counts, classes, title))


def confusion_figure(counts, classes, title: str) -> Figure:
    """The figure of :func:`confusion_png`: colour bar with whole-number ticks, readable names."""
    counts = np.asarray(counts)
    size = 1.2 + 0.9 * len(classes)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.locator = MaxNLocator(integer=True)  # counts of images: whole numbers only
    bar.update_ticks()
    bar.set_label("images")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")
    names = [human(c) for c in classes]
    ax.set_xticks(range(len(classes)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(human(title), fontsize=9)
    return fig


def roc_png(predictions: pd.DataFrame, classes, title: str) -> bytes:
    """One-vs-rest ROC curves per class from the image-level mean probabilities."""
    roc = roc_per_class(
        predictions["truth"].to_numpy(dtype=str), predictions[[f"proba_{c}" for c in classes]].to_numpy(), classes
    )
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    for c, (fpr, tpr) in roc["curves"].items():
        ax.plot(fpr, tpr, label=f"{human(c)} (AUC {roc['auc'][c]:.3f})")
    _roc_axes(ax, f"{title}\nmacro AUC {roc['macro_auc']:.3f}")
    return _figure_png(fig)


def _roc_axes(ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(human(title), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)


def grouping_roc_png(predictions: pd.DataFrame, classes, title: str, to_binary=None) -> bytes | None:
    """ROC of the binary row (bold; carcinoma vs non-carcinoma for BACH) and of each pair of
    classes; ``None`` when the scheme has no grouping beyond its own classes (two classes)."""
    roc = grouping_roc(predictions, classes, to_binary)
    if not roc["curves"]:
        return None
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    for name, (fpr, tpr) in roc["curves"].items():
        main = name == next(iter(roc["curves"]))  # the binary row comes first
        ax.plot(fpr, tpr, linewidth=2.2 if main else 1.0, linestyle="-" if main else "--",
                label=f"{human(name)} (AUC {roc['auc'][name]:.3f})")
    _roc_axes(ax, title)
    return _figure_png(fig)


def calibration_png(predictions: pd.DataFrame, classes, title: str) -> bytes:
    """Reliability diagram of the mean probabilities: accuracy against confidence per bin."""
    rel = reliability(predictions, classes)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    conf = [b["confidence"] for b in rel["bins"]]
    acc = [b["accuracy"] for b in rel["bins"]]
    sizes = [20 + 200 * b["n"] / len(predictions) for b in rel["bins"]]
    ax.plot(conf, acc, color="tab:blue", linewidth=1)
    ax.scatter(conf, acc, s=sizes, color="tab:blue", zorder=3, label="bins (area ~ images)")
    for b in rel["bins"]:
        ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), textcoords="offset points", xytext=(6, -10),
                    fontsize=7, color="#555")
    ax.set_xlabel("mean probability of the predicted class (confidence)")
    ax.set_ylabel("fraction of those images predicted right")
    ax.set_title(human(f"{title}\nexpected calibration error {rel['ece']:.3f}"), fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.02, 1.02)
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
                # Spanhol et al.'s patient-level accuracy (each image its own patient without groups).
                "patient_accuracy": r["majority"].get("patient_accuracy"),
                "accuracy_ci_low": r["ci95"]["accuracy_majority"][0],
                "accuracy_ci_high": r["ci95"]["accuracy_majority"][1],
                "macro_auc": r["roc_auc"]["macro"],
                "macro_auc_ci_low": r["ci95"]["macro_auc"][0],
                "macro_auc_ci_high": r["ci95"]["macro_auc"][1],
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


def _sentence(text: str) -> str:
    """``text`` with its first letter capitalised (``str.capitalize`` would lower the rest)."""
    return text[:1].upper() + text[1:]


def _ci(pair) -> str:
    return "n/a" if pair is None or None in pair else f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _html_table(frame: pd.DataFrame, index: bool = False, corner: str | None = None) -> str:
    """One header row: the index becomes the first column (headed ``corner`` or its name), so
    pandas' extra row of index and column-axis names never appears."""
    frame = frame.copy()
    if index:
        name = corner or frame.index.name or ""
        frame.index.name = None
        frame = frame.reset_index().rename(columns={"index": name})
    frame.columns = [human(c) for c in frame.columns]
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a", border=0, classes="t")


def _html_confusion(confusion: dict) -> str:
    frame = _confusion_frame(confusion)
    frame.index = [human(c) for c in frame.index]
    return _html_table(frame, index=True, corner="truth \\ predicted")


def _html_summary(summary: dict) -> pd.DataFrame:
    rows = []
    for name, r in summary["runs"].items():
        maj, ci = r["majority"], r["ci95"]
        rows.append({
            "run": name,
            "classifier": r["classifier"],
            "fusion": r["fusion"],
            "stores": " + ".join(r["stores"]),
            "accuracy (majority)": maj["accuracy"],
            "95% CI": _ci(ci["accuracy_majority"]),
            "folds mean ± sd": f"{maj['fold_accuracy_mean']:.3f} ± {_fmt(maj['fold_accuracy_sd'])}",
            "accuracy (mean proba)": r["mean_proba"]["accuracy"],
            "balanced accuracy": maj["balanced_accuracy"],
            "macro AUC": r["roc_auc"]["macro"],
            "AUC 95% CI": _ci(ci["macro_auc"]),
            "row accuracy": r["row_accuracy"],
        })
    return pd.DataFrame(rows)


def _html_auc(r: dict) -> pd.DataFrame:
    """AUC with its 95 % CI: per class, macro, and each grouping."""
    auc, ci = r["roc_auc"], r["ci95"]
    rows = [{"ROC": f"{c} (one vs rest)", "AUC": v, "95% CI": _ci(ci.get(f"auc {c}"))}
            for c, v in auc["per_class"].items()]
    rows.append({"ROC": "macro (mean over classes)", "AUC": auc["macro"], "95% CI": _ci(ci.get("macro_auc"))})
    rows += [{"ROC": name, "AUC": v, "95% CI": _ci(ci.get(f"auc {name}"))} for name, v in auc.get("groupings", {}).items()]
    frame = pd.DataFrame(rows)
    frame["ROC"] = frame["ROC"].map(human)
    return frame


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table.t{border-collapse:collapse;margin:0.5em 0 1em}
table.t th,table.t td{border:1px solid #ccc;padding:2px 8px;text-align:right}
table.t th{background:#f0f0f0}
table.t td:first-child{text-align:left}
h2{border-bottom:1px solid #999;margin-top:2em}
.pics img{margin-right:1em;vertical-align:top}
.note{color:#555;font-size:90%}
blockquote.methods{background:#f7f7f2;border-left:4px solid #999;margin:0.5em 0;padding:0.6em 1em}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure.err{margin:0;width:180px;font-size:80%}
figure.err img{max-width:170px;max-height:170px;display:block}
.missing{width:160px;height:120px;background:#eee;color:#777;text-align:center;line-height:120px}
"""


def _methods_html(summary: dict) -> list:
    """The Methods section: the paragraph to paste, then every value it rests on."""
    esc = html.escape
    m = summary["methods"]
    data = m["data"]
    parts = [
        "<h2>Methods</h2>",
        "<p class='note'>Ready to paste (also in methods.txt):</p>",
        f"<blockquote class='methods'>{esc(summary['methods_paragraph'])}</blockquote>",
        "<h3>Data</h3>",
        _html_table(pd.DataFrame({
            "class": [human(c) for c in data["classes"]],
            "images": [data["images_per_class"][c] for c in data["classes"]],
            "groups" + (" (patients)" if data["groups_are_patients"] else " (each image its own)"):
                [data["groups_per_class"][c] for c in data["classes"]],
        })),
    ]
    for store in m["extraction"]:
        stain = store["stain"]
        unnormalised = store["unnormalised"]
        rows = [
            ("backbone", store["backbone"]),
            ("weights", store["weights"]),
            ("weights sha256", store["weights_sha256"] or "n/a (no weights file)"),
            ("stain normalisation", "none" if not stain else f"{stain['method']}, reference {stain['reference']}"),
            ("stain reference sha256", "n/a" if not stain else stain["reference_sha256"]),
            ("images left unnormalised", f"{len(unnormalised)}" + (": " + "; ".join(
                f"{u['image_id']} ({u['reason']})" for u in unnormalised[:20]) if unnormalised else "")
             + (" (Macenko's stain estimate failed on them)" if unnormalised else "")),
            ("colour augmentations per image", store["augmentations"]),
            ("augmentation ranges",
             f"gain 1 ± {store['hed_sigma']}, shift ± {store['hed_sigma']} per stain concentration "
             "(haematoxylin, eosin, DAB; Tellez et al. 2019)" if store.get("color_augmentation") == "hed"
             else f"gain 1 ± {store['color_gain']}, shift ± {store['color_shift']} levels per RGB channel"),
            ("crops per augmentation", "whole image" if store["mode"] == "whole" else store["crops"]),
            ("crop size (px, after scaling; capped at the shorter image side)",
             "n/a" if store["mode"] == "whole" else store["crop_size"]),
            ("crop sides the images got (px)", ", ".join(map(str, store.get("crop_sides") or [])) or "n/a"),
            ("scale", store["scale"]),
            ("mode", store["mode"]),
            ("pooling", store["pooling"]),
            ("precision", store["precision"]),
            ("seed", store["seed"]),
            ("batch size", store["batch_size"]),
            ("config hash", store["config_hash"]),
        ]
        parts += [f"<h3>Extraction: store {esc(store['name'])}</h3>",
                  _html_table(pd.DataFrame(rows, columns=["setting", "value"]).astype(str))]
    for clf in m["classifiers"]:
        rows = [(k, str(v)) for k, v in clf["params"].items()]
        if clf["tuned"]:
            rows += [(f"{k} (tuned: inner grouped 3-fold CV over {v})",
                      ", ".join(f"{val} in {n} fold(s)" for val, n in clf["chosen"].get(k, {}).items()))
                     for k, v in clf["grid"].items()]
        parts += [f"<h3>Classifier: {esc(clf['name'])}</h3>", f"<p>{esc(clf['words'])}.</p>",
                  _html_table(pd.DataFrame(rows, columns=["parameter", "value"]).astype(str))]
    cv = m["cross_validation"]
    parts += [
        "<h3>Cross-validation</h3>",
        f"<p>{cv['n_folds']} folds, {esc(cv['splitter'])}, grouped by "
        f"{'patient' if data['groups_are_patients'] else 'image'}; fold seed {cv['fold_seed']} (also seeds the "
        f"classifiers); voting: {esc(cv['voting'])}. Folds are numbered 0 to {cv['n_folds'] - 1} here, in "
        "folds.csv and in the log. 95% confidence intervals: percentile bootstrap over "
        f"{'patients' if data['groups_are_patients'] else 'images'}, {BOOTSTRAP_RESAMPLES} resamples, "
        "fixed seed (numpy.random.default_rng(0)).</p>",
        "<h3>Software</h3>",
        _html_table(pd.DataFrame([(k, v or "not installed") for k, v in m["versions"].items()],
                                 columns=["package", "version"])),
        "<h3>Command</h3>",
        f"<pre>{esc(m['command'] or '(not run from the command line: called from Python)')}</pre>",
    ]
    return parts


def _gallery_html(errors: pd.DataFrame, thumbnails: dict) -> list:
    """Thumbnails of the misclassified images, most confident first."""
    esc = html.escape
    if not len(errors):
        return ["<p>No misclassified image.</p>"]
    cards = []
    for _, e in errors.iterrows():
        thumb = thumbnails.get(e["image_id"])
        picture = (f'<img alt="{esc(str(e["image_id"]))}" src="data:image/jpeg;base64,'
                   f'{base64.b64encode(thumb).decode("ascii")}">' if thumb else
                   "<div class='missing'>image not readable</div>")
        cards.append(
            f"<figure class='err' data-image-id='{esc(str(e['image_id']))}'>{picture}<figcaption>"
            f"<b>{esc(str(e['image_id']))}</b><br>truth <b>{esc(human(e['truth']))}</b>, predicted "
            f"<b>{esc(human(e['prediction']))}</b><br>votes {e['votes']}/{e['n_aug']}, p = {e['proba_prediction']:.3f} "
            f"(truth {e['proba_truth']:.3f}); fold {e['fold']}</figcaption></figure>")
    return [f"<p class='note'>{len(errors)} misclassified image(s) (majority voting), most confident error first "
            "(highest mean probability of the predicted class); also in errors.csv.</p>",
            "<div class='gallery'>", *cards, "</div>"]


def _html(summary: dict, pictures: dict, galleries: dict | None = None, thumbnails: dict | None = None) -> str:
    esc = html.escape
    cfg = summary["config"]
    device = summary["device"]
    stores = pd.DataFrame(summary["stores"]).drop(columns=["versions"], errors="ignore")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Cross-validation report ({esc(cfg['scheme'])})</title><style>{_CSS}</style></head><body>",
        f"<h1>Cross-validation report: {esc(cfg['scheme'])} scheme</h1>",
        f"<p>{summary['n_images']} images ({summary['n_rows']} augmented rows, {summary['n_groups']} groups), "
        f"classes {esc(', '.join(human(c) for c in summary['classes']))}"
        + (f" (absent: {esc(', '.join(summary['absent_classes']))})" if summary["absent_classes"] else "")
        + f"; {cfg['n_folds']}-fold StratifiedGroupKFold, seed {cfg['seed']}; "
        + (f"XGBoost ran on the <b>{'GPU' if device['xgboost'] == 'cuda' else 'CPU'}</b> ({esc(device['reason'])}); " if device else "")
        + f"{summary['seconds']:.1f} s.</p>",
        *report_levels.dataset_html(summary),
        "<h2>Summary</h2>",
        _html_table(_html_summary(summary)),
        "<p class='note'>accuracy (majority): majority voting over each image's augmentations, with its 95% "
        "bootstrap confidence interval; folds mean ± sd: mean and sample sd (ddof=1) of the per-fold accuracies; "
        "accuracy (mean proba): mean-probability voting; row accuracy: single augmentations before voting.</p>",
        *_methods_html(summary),
        "<h3>Stores</h3>",
        _html_table(stores),
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
            f"<p class='note'>{esc(_sentence(two_stage_training_words(info['config'])))}. Runs: two_stage "
            "(single pass), two_stage_ensemble (8 rotations/flips; majority = vote of the views, mean "
            "probability = the paper's rule), patch_majority / patch_max / patch_sum (patch-fusion "
            f"baselines, single pass). Stain reference: {esc(str(info['stain_reference']))}; "
            f"{info['seconds']:.0f} s.</p>",
            _html_table(pd.DataFrame(info["folds"])),
            f"<pre>{esc(json.dumps(info['config'], indent=1))}</pre>",
        ]
    for name, r in summary["runs"].items():
        maj, ci = r["majority"], r["ci95"]
        pics = pictures[name]
        parts += [
            f"<h2>Run {esc(name)}</h2>",
            f"<p>classifier {esc(r['classifier'])}, fusion {esc(r['fusion'])}, stores {esc(' + '.join(r['stores']))}; "
            f"accuracy {maj['accuracy']:.3f} (95% CI {_ci(ci['accuracy_majority'])}, majority), "
            f"{r['mean_proba']['accuracy']:.3f} (mean probability); "
            f"folds {maj['fold_accuracy_mean']:.3f} &plusmn; {_fmt(maj['fold_accuracy_sd'])}; "
            f"macro AUC {_fmt(r['roc_auc']['macro'])} (95% CI {_ci(ci['macro_auc'])}).</p>",
            *report_levels.run_html(r, summary["n_images"]),
            "<h3>Confusion matrix (majority voting; rows truth, columns predicted)</h3>",
            _html_confusion(maj["confusion"]),
            "<h3>Per class</h3>",
            _html_table(pd.DataFrame(maj["per_class"]).assign(**{"class": lambda f: f["class"].map(human)})),
            "<h3>Binary comparisons (El Agouri et al. 2022, Table 1)</h3>",
            _html_table(pd.DataFrame(maj["binary_table"]).assign(
                comparison=lambda f: f["comparison"].map(human), positive=lambda f: f["positive"].map(human),
                negative=lambda f: f["negative"].map(human))),
            "<h3>Confusion matrix (mean-probability voting)</h3>",
            _html_confusion(r["mean_proba"]["confusion"]),
            "<h3>ROC and calibration (image-level mean probabilities)</h3>",
            _html_table(_html_auc(r)),
            "<div class='pics'>",
            _img(pics["confusion"], f"confusion matrix {name}"),
            _img(pics["roc"], f"ROC {name}"),
            *([_img(pics["roc_groupings"], f"ROC of the groupings {name}")] if pics.get("roc_groupings") else []),
            _img(pics["calibration"], f"calibration {name}"),
            "</div>",
            f"<p class='note'>Calibration: expected calibration error {r['calibration']['ece']:.3f} "
            "(top label, 10 bins; 0 = the mean probabilities are the observed accuracies).</p>",
        ]
        if galleries is not None:
            parts += ["<h3>Misclassified images</h3>", *_gallery_html(galleries[name], thumbnails or {})]
    parts += ["<h2>Conventions</h2><ul>"]
    parts += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in summary["conventions"].items()]
    parts += ["</ul>", "<p class='note'>Fold of every image: folds.csv; per-image predictions: predictions.csv.</p>",
              "</body></html>"]
    return "\n".join(parts)


def run_directory(name: str) -> str:
    """File-system safe directory name of a run (run names come from store names)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def write_report(result: CVResult, out_dir, command: str | None = None) -> dict:
    """Write all report files into ``out_dir`` (created if needed).

    Parameters
    ----------
    result : CVResult
    out_dir : str or Path
    command : str, optional
        Command line stated in the Methods (``None``: made from Python, said so).

    Returns
    -------
    dict
        ``{"summary": metrics dict, "files": list of written paths}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result, command)
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
    save(out / "methods.txt", summary["methods_paragraph"] + "\n")
    if summary["config"]["tune"]:
        save(out / "tuning.csv", _tuning_table(summary).to_csv(index=False))

    pictures, galleries, thumbnails = {}, {}, {}
    groupings = getattr(result.dataset, "groupings", None)
    to_binary = None if groupings is None else grouping_to_binary(groupings)
    classes = list(result.dataset.classes)
    images = result.dataset.images
    paths = dict(zip(images["image_id"], images["path"])) if "path" in images else {}
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
            "roc_groupings": grouping_roc_png(run.predictions, classes, f"{name}: ROC of the groupings", to_binary),
            "calibration": calibration_png(run.predictions, classes, f"{name}: reliability of the mean probabilities"),
        }
        for picture in ("confusion", "roc", "roc_groupings", "calibration"):
            if pictures[name][picture] is not None:
                save(run_dir / f"{picture}.png", pictures[name][picture])
        galleries[name] = misclassified(run.predictions, classes, paths)
        save(run_dir / "errors.csv", galleries[name].to_csv(index=False))
        for image_id in galleries[name]["image_id"]:
            if image_id not in thumbnails:  # one thumbnail per image, shared by the runs
                thumbnails[image_id] = thumbnail_jpeg(paths.get(image_id))
    save(out / "report.html", _html(summary, pictures, galleries, thumbnails))
    return {"summary": summary, "files": [str(p) for p in written]}
