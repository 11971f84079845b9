"""Predictions -> the classification report: scikit-learn's metrics, calibration, ranking, the most-confused classes.

Every number comes from ``sklearn.metrics`` on ``labels=range(C)`` (a class with no image or
never predicted keeps its row and column) with ``zero_division=0``; only the calibration
figures, the loss, top-k from the scores and the confused-class lists are ours. The
statistics underneath (bins, bootstrap, comparison) are in :mod:`~torchtool.core.evaluate.stats`.
"""

from __future__ import annotations

import csv
import io
import warnings
from typing import Any, Sequence

import numpy as np

from torchtool.core.evaluate.predictions import Predictions
from torchtool.core.evaluate.stats import (
    ECE_BINS, bootstrap_intervals, calibration_bin, capped_ks, expected_calibration_error, known_confidence,
    ranking_scores, true_rank,
)

__all__ = ["ECE_BINS", "Predictions", "build_report", "expected_calibration_error", "sample_losses"]

CONFUSED = 5  # confused_1 .. confused_5 in the CSV
REPORT_COLUMNS = ("class", "label", "support", "precision", "recall", "f1", "auc", "ap",
                  *(f"confused_{i}" for i in range(1, CONFUSED + 1)))
TINY = float(np.finfo(np.float32).tiny)  # a true class scored 0 costs -log(tiny) ~ 87.3, not infinity


def most_confused(matrix: np.ndarray, label: int, classes: list[str], n: int = CONFUSED) -> list[tuple[str, int]]:
    """The ``n`` classes images of ``label`` were most often taken for (row = true class), ties by label."""
    row = np.array(matrix[label])
    row[label] = 0
    others = np.flatnonzero(row)
    others = others[np.argsort(-row[others], kind="stable")[:n]]  # stable: a tie keeps label order
    return [(classes[j], int(row[j])) for j in others]


def sample_losses(preds: Predictions) -> np.ndarray | None:
    """Each image's cross-entropy, -log(max(p_true, float32 tiny)), from ``probs`` (float64); None without them."""
    if preds.probs is None:
        return None
    own = np.asarray(preds.probs)[np.arange(len(preds.labels)), preds.labels].astype(np.float64)
    return -np.log(np.maximum(own, TINY))


def _ranking(preds: Predictions, support: np.ndarray) -> tuple[list[Any], dict[str, Any] | None, list[str]]:
    """Per-class one-vs-rest (AUC, AP) from ``probs`` (scikit-learn's figures, see
    :func:`~torchtool.core.evaluate.stats.ranking_scores`), their macro and support-weighted means, and notes.

    A class with no positive or no negative image has no AUC/AP and is left out of the averages.
    """
    n_classes = len(preds.classes)
    if preds.probs is None:
        return [(None, None)] * n_classes, None, []
    auc, ap = ranking_scores(preds.probs, preds.labels)
    per = [(None, None) if np.isnan(auc[c]) else (float(auc[c]), float(ap[c])) for c in range(n_classes)]
    kept = [c for c in range(n_classes) if per[c][0] is not None]
    weights = support[kept].astype(np.float64)
    ranking: dict[str, Any] = {"left_out": [preds.classes[c] for c in range(n_classes) if per[c][0] is None]}
    for how, w in (("macro", np.ones(len(kept))), ("weighted", weights)):
        ranking[how] = {key: (float(np.average([per[c][j] for c in kept], weights=w)) if kept else None)
                        for j, key in enumerate(("auc", "ap"))}
    notes = []
    no_positive = sum(1 for c in range(n_classes) if not support[c])
    if no_positive:
        notes.append(f"{no_positive} class{' has' if no_positive == 1 else 'es have'} no positive image: "
                     "left out of the AUC/AP averages")
    if len(kept) + no_positive < n_classes:  # one class holds every image: it has no negative
        notes.append("1 class has no negative image: left out of the AUC/AP averages")
    return per, ranking, notes


def _calibration(conf: np.ndarray | None, correct: np.ndarray) -> dict[str, Any] | None:
    """The ECE's own bins: count, mean confidence and accuracy per bin (None where a bin is empty)."""
    if conf is None:
        return None
    which = calibration_bin(conf)
    count = np.bincount(which, minlength=ECE_BINS)
    sums = np.bincount(which, conf, ECE_BINS), np.bincount(which, correct.astype(np.float64), ECE_BINS)
    mean = [[float(v[b] / count[b]) if count[b] else None for b in range(ECE_BINS)] for v in sums]
    return {"bins": ECE_BINS, "edges": [b / ECE_BINS for b in range(ECE_BINS + 1)], "count": count.tolist(),
            "confidence": mean[0], "accuracy": mean[1]}


def build_report(preds: Predictions, top_k: dict[str, float] | None = None, *, ks: Sequence[int] = (1, 5),
                 bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """The whole report as plain data (per class, averages, confusion matrix, accuracy, calibration, ranking).

    Top-k accuracies (``ks``, capped at the class count) come from ``preds.probs``, or from
    ``top_k`` ({"top1": ..., "top5": ...}) when given. ``bootstrap`` > 0 adds ``ci``: percentile
    intervals from that many resamples drawn with ``seed``. ``notes`` are lines for stderr.
    """
    from sklearn import metrics

    classes, y, p = preds.classes, preds.labels, preds.predictions
    labels = list(range(len(classes)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    averages = {}
    for how in ("micro", "macro", "weighted"):
        ap, ar, af, _ = metrics.precision_recall_fscore_support(y, p, labels=labels, average=how, zero_division=0)
        averages[how] = {"precision": float(ap), "recall": float(ar), "f1": float(af), "support": int(len(y))}
    with warnings.catch_warnings():
        # one class in all: sklearn asks for labels=, which it has, so the 1x1 matrix is the right shape
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        matrix = metrics.confusion_matrix(y, p, labels=labels)
        # "y_pred contains classes not in y_true": those classes are left out, as meant
        warnings.simplefilter("ignore")
        balanced = float(metrics.balanced_accuracy_score(y, p))
    ranks, ranking, notes = _ranking(preds, support)
    per_class = [{"class": name, "label": i, "support": int(support[i]), "precision": float(precision[i]),
                  "recall": float(recall[i]), "f1": float(f1[i]), "auc": ranks[i][0], "ap": ranks[i][1],
                  "confused": [{"class": c, "count": k} for c, k in most_confused(matrix, i, classes)]}
                 for i, name in enumerate(classes)]
    conf = known_confidence(preds)
    correct = np.asarray(y) == np.asarray(p)
    if top_k is None and preds.probs is not None:
        rank = true_rank(np.asarray(preds.probs), np.asarray(y))
        top_k = {f"top{k}": float((rank < k).mean()) for k in capped_ks(ks, len(classes))}
    losses = sample_losses(preds)
    report = {"images": int(len(y)), "classes": len(classes), "accuracy": float(metrics.accuracy_score(y, p)),
              "top_k": top_k, "balanced_accuracy": balanced,
              "ece": None if conf is None else expected_calibration_error(conf, correct),
              "loss": None if losses is None else float(losses.mean()), "averages": averages,
              "per_class": per_class, "class_names": list(classes), "confusion_matrix": matrix.tolist(),
              "ranking": ranking, "calibration": _calibration(conf, correct), "notes": notes}
    if bootstrap > 0:
        report["ci"] = bootstrap_intervals(preds, bootstrap, seed, ks)
    return report


def report_rows(report: dict[str, Any], text: bool = True) -> list[dict[str, Any]]:
    """The spreadsheet's rows: one per class in label order, then ``All`` (micro), ``Macro`` and ``Weighted``.

    Fractions as 4-decimal text (the CSV, the table), or with ``text=False`` as numbers rounded
    to 4 decimals (JSON Lines: numbers stay numbers); an AUC/AP that is undefined is empty (null).
    """
    def _frac(value: float | None) -> Any:
        if value is None:
            return "" if text else None
        return f"{value:.4f}" if text else round(value, 4)

    def _row(name: str, label: Any, support: int, figures: dict[str, Any], ranks: dict[str, Any],
             confused: list[str]) -> dict[str, Any]:
        confused = confused + [""] * (CONFUSED - len(confused))
        return {"class": name, "label": label, "support": support,
                **{k: _frac(figures[k]) for k in ("precision", "recall", "f1")},
                "auc": _frac(ranks.get("auc")), "ap": _frac(ranks.get("ap")),
                **{f"confused_{i + 1}": v for i, v in enumerate(confused)}}

    rows = [_row(c["class"], c["label"], c["support"], c, c, [f"{d['class']}:{d['count']}" for d in c["confused"]])
            for c in report["per_class"]]
    ranking = report.get("ranking") or {}
    for name, key in (("All", "micro"), ("Macro", "macro"), ("Weighted", "weighted")):
        avg = report["averages"][key]
        rows.append(_row(name, "", avg["support"], avg, ranking.get(key) or {}, []))
    return rows


def _csv(header: list[Any], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def report_csv(report: dict[str, Any]) -> str:
    """``--csv``: header ``class,label,support,precision,recall,f1,auc,ap,confused_1..5``, 4-decimal fractions."""
    return _csv(list(REPORT_COLUMNS), [[r[c] for c in REPORT_COLUMNS] for r in report_rows(report)])


def confusion_csv(report: dict[str, Any]) -> str:
    """``--confusion-csv``: counts, true class by row, predicted class by column."""
    names = report["class_names"]
    return _csv(["true\\predicted", *names], [[n, *row] for n, row in zip(names, report["confusion_matrix"])])


def summary_lines(report: dict[str, Any]) -> dict[str, Any]:
    """The totals under the per-class table; with ``ci``, each figure that has one as ``0.8528 [0.8161, 0.8861]``."""
    ci = report.get("ci") or {}

    def _shown(key: str, value: float | None) -> Any:
        if value is None:
            return None
        if key in ci:
            lo, hi = ci[key]
            return f"{value:.4f} [{lo:.4f}, {hi:.4f}]"
        return round(value, 4)

    top = {f"{k}_accuracy": _shown(k, v) for k, v in (report["top_k"] or {}).items() if k != "top1"}
    return {"images": report["images"], "accuracy": _shown("accuracy", report["accuracy"]), **top,
            "balanced_accuracy": _shown("balanced_accuracy", report["balanced_accuracy"]),
            "macro_f1": _shown("macro_f1", report["averages"]["macro"]["f1"]),
            "ece": _shown("ece", report["ece"]), "loss": _shown("loss", report.get("loss"))}
