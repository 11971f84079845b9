"""Predictions -> the classification report: scikit-learn's metrics, calibration, the most-confused classes.

Every number comes from ``sklearn.metrics`` on ``labels=range(C)`` (a class with no image or
never predicted keeps its row and column) with ``zero_division=0``; only the expected
calibration error and the confused-class lists are ours.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFUSED = 5  # confused_1 .. confused_5 in the CSV
ECE_BINS = 15
REPORT_COLUMNS = ("class", "label", "support", "precision", "recall", "f1",
                  *(f"confused_{i}" for i in range(1, CONFUSED + 1)))


@dataclass
class Predictions:
    """One prediction per image: label and prediction as class indices into ``classes``."""

    classes: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    scores: np.ndarray | None = None  # the predicted class's softmax probability
    paths: list[str] | None = None


def expected_calibration_error(confidence: Any, correct: Any, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width confidence bins ``(lo, hi]``: sum over bins of |accuracy - confidence| x share.

    A confidence on an edge k/bins belongs to the bin below it; 0 joins the first bin and 1.0
    the last. Per bin, share x |acc - conf| = |sum(correct) - sum(confidence)| / N, so two
    bincounts do it.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    if not conf.size:
        return float("nan")
    hits = np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(which, hits, bins) - np.bincount(which, conf, bins)
    return float(np.abs(gap).sum() / conf.size)


def most_confused(matrix: np.ndarray, label: int, classes: list[str], n: int = CONFUSED) -> list[tuple[str, int]]:
    """The ``n`` classes images of ``label`` were most often taken for (row = true class), ties by label."""
    row = matrix[label]
    others = [j for j in range(len(row)) if j != label and row[j] > 0]
    others.sort(key=lambda j: (-row[j], j))
    return [(classes[j], int(row[j])) for j in others[:n]]


def build_report(preds: Predictions, top_k: dict[str, float] | None = None) -> dict[str, Any]:
    """The whole report as plain data (per class, averages, confusion matrix, accuracy, ECE).

    ``top_k`` ({"top1": ..., "top5": ...}) needs the model's scores for every class, so only a
    model run has it.
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
    per_class = [{"class": name, "label": i, "support": int(support[i]), "precision": float(precision[i]),
                  "recall": float(recall[i]), "f1": float(f1[i]),
                  "confused": [{"class": c, "count": k} for c, k in most_confused(matrix, i, classes)]}
                 for i, name in enumerate(classes)]
    ece = None  # no scores, or a score that is NaN: no calibration figure rather than a wrong one
    if preds.scores is not None and not np.isnan(preds.scores).any():
        ece = expected_calibration_error(preds.scores, y == p)
    return {"images": int(len(y)), "classes": len(classes), "accuracy": float(metrics.accuracy_score(y, p)),
            "top_k": top_k, "balanced_accuracy": balanced, "ece": ece, "averages": averages,
            "per_class": per_class, "class_names": list(classes), "confusion_matrix": matrix.tolist()}


def report_rows(report: dict[str, Any], text: bool = True) -> list[dict[str, Any]]:
    """The spreadsheet's rows: one per class in label order, then ``All`` (micro) and ``Macro``.

    Fractions as 4-decimal text (the CSV, the table), or with ``text=False`` as numbers rounded
    to 4 decimals (JSON Lines: numbers stay numbers).
    """
    def _frac(value: float) -> Any:
        return f"{value:.4f}" if text else round(value, 4)

    rows = []
    for c in report["per_class"]:
        confused = [f"{d['class']}:{d['count']}" for d in c["confused"]]
        confused += [""] * (CONFUSED - len(confused))
        rows.append({"class": c["class"], "label": c["label"], "support": c["support"],
                     "precision": _frac(c["precision"]), "recall": _frac(c["recall"]), "f1": _frac(c["f1"]),
                     **{f"confused_{i + 1}": v for i, v in enumerate(confused)}})
    for name, key in (("All", "micro"), ("Macro", "macro")):
        avg = report["averages"][key]
        rows.append({"class": name, "label": "", "support": avg["support"], "precision": _frac(avg["precision"]),
                     "recall": _frac(avg["recall"]), "f1": _frac(avg["f1"]),
                     **{f"confused_{i}": "" for i in range(1, CONFUSED + 1)}})
    return rows


def _csv(header: list[Any], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def report_csv(report: dict[str, Any]) -> str:
    """``--csv``: header ``class,label,support,precision,recall,f1,confused_1..5``, 4-decimal fractions."""
    return _csv(list(REPORT_COLUMNS), [[r[c] for c in REPORT_COLUMNS] for r in report_rows(report)])


def confusion_csv(report: dict[str, Any]) -> str:
    """``--confusion-csv``: counts, true class by row, predicted class by column."""
    names = report["class_names"]
    return _csv(["true\\predicted", *names], [[n, *row] for n, row in zip(names, report["confusion_matrix"])])


def summary_lines(report: dict[str, Any]) -> dict[str, Any]:
    """The totals under the per-class table."""
    top = {f"{k}_accuracy": round(v, 4) for k, v in (report["top_k"] or {}).items() if k != "top1"}
    return {"images": report["images"], "accuracy": round(report["accuracy"], 4), **top,
            "balanced_accuracy": round(report["balanced_accuracy"], 4),
            "ece": None if report["ece"] is None else round(report["ece"], 4)}
