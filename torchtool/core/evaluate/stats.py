"""The statistics under the report: calibration bins, top-k hits, bootstrap intervals, two models compared.

Pure numpy/scipy on :class:`~torchtool.core.evaluate.predictions.Predictions`; the report
(``report.py``) builds on these, never the other way round.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from torchtool.core.evaluate.predictions import Predictions
from torchtool.core.output import UsageError

ECE_BINS = 15
LEVEL = 95  # percent: the bootstrap's percentile interval
CHUNK = 1 << 22  # resampled images per step of the bootstrap (~32 MB of int64 indices)


def calibration_bin(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Each confidence's bin among ``bins`` equal-width bins ``(lo, hi]``: an edge k/bins belongs to the bin
    below it, 0 joins the first bin and 1.0 the last."""
    return np.clip(np.ceil(np.asarray(confidence, dtype=np.float64) * bins).astype(np.int64) - 1, 0, bins - 1)


def expected_calibration_error(confidence: Any, correct: Any, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width confidence bins: sum over bins of |accuracy - confidence| x share.

    Per bin, share x |acc - conf| = |sum(correct) - sum(confidence)| / N, so two bincounts do it.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    if not conf.size:
        return float("nan")
    hits = np.asarray(correct, dtype=np.float64)
    which = calibration_bin(conf, bins)
    gap = np.bincount(which, hits, bins) - np.bincount(which, conf, bins)
    return float(np.abs(gap).sum() / conf.size)


def true_rank(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How many classes rank above the true one: higher scores, and equal scores of a lower index (argmax's order)."""
    own = probs[np.arange(len(labels)), labels][:, None]
    rank = np.count_nonzero(probs > own, axis=1)
    tied = np.flatnonzero(np.count_nonzero(probs >= own, axis=1) - rank > 1)  # rare: only those rows again
    lower = np.arange(probs.shape[1])[None, :] < labels[tied, None]
    rank[tied] += np.count_nonzero((probs[tied] == own[tied]) & lower, axis=1)
    return rank


def ranking_scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each class's one-vs-rest ROC-AUC and average precision from its column of scores; NaN for a class
    with no positive or no negative image.

    The same figures as ``sklearn.metrics.roc_auc_score`` / ``average_precision_score`` (tested to
    1e-12), from one sort per column and each positive's place in it: AUC is Mann-Whitney's U
    (a tie counts a half), AP the mean over positives of the precision at their score. scikit-learn
    validates and builds a curve per class: 65 s for 50,000 images of 1,000 classes on 2 cores.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    n, c = probs.shape
    by_class = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[by_class], np.arange(c + 1))
    own = probs[by_class, labels[by_class]]  # the positives' scores, grouped by class
    auc, ap = np.full(c, np.nan), np.full(c, np.nan)
    block = 256  # classes sorted at a time: [256, N] float32, not a second copy of every score
    for first in range(0, c, block):
        columns = np.ascontiguousarray(probs[:, first:first + block].T)
        columns.sort(axis=1)
        for k in range(first, min(first + block, c)):
            pos = np.sort(own[bounds[k]:bounds[k + 1]])
            npos = len(pos)
            if npos in (0, n):
                continue
            col = columns[k - first]
            below, upto = np.searchsorted(col, pos, "left"), np.searchsorted(col, pos, "right")
            pos_below, pos_upto = np.searchsorted(pos, pos, "left"), np.searchsorted(pos, pos, "right")
            neg_below = below - pos_below
            neg_tied = (upto - below) - (pos_upto - pos_below)
            auc[k] = (neg_below + 0.5 * neg_tied).sum() / (npos * (n - npos))
            ap[k] = ((npos - pos_below) / (n - below)).sum() / npos
    return auc, ap


def capped_ks(ks: Sequence[int], n_classes: int) -> list[int]:
    """The top-k's to report: each k capped at the class count, once each, in order."""
    return sorted({min(int(k), n_classes) for k in ks})


def known_confidence(preds: Predictions) -> np.ndarray | None:
    """The scores the calibration figures use; None when unknown (absent, or any NaN: no figure beats a wrong one)."""
    if preds.scores is None or np.isnan(preds.scores).any():
        return None
    return np.asarray(preds.scores, dtype=np.float64)


def bootstrap_intervals(preds: Predictions, n: int, seed: int = 0, ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """95% percentile intervals of accuracy, top-k (k > 1, from ``probs``), balanced accuracy, macro-F1 and ECE.

    Resample r draws ``np.random.default_rng(seed).integers(0, N, size=(n, N))[r]`` (drawn in
    chunks of rows, the same numbers). Each figure is a sum over images of a per-image feature
    (a class indicator, a hit, a bin's accuracy-minus-confidence), so one sparse product of the
    resamples' image counts [n, N] with those features [N, F] gives every figure of every resample.
    """
    from scipy import sparse

    y, p = np.asarray(preds.labels), np.asarray(preds.predictions)
    total, c = len(y), len(preds.classes)
    right = y == p
    # columns: support by class, predicted by class, right by class, [bins of correct - confidence], [top-k hits]
    rows = [np.arange(total)] * 3
    cols = [y, c + p, 2 * c + y]
    vals = [np.ones(total), np.ones(total), right.astype(np.float64)]
    width = 3 * c
    conf = known_confidence(preds)
    if conf is not None:
        rows.append(np.arange(total))
        cols.append(width + calibration_bin(conf))
        vals.append(right - conf)
        width += ECE_BINS
    tops = [k for k in capped_ks(ks, c) if k > 1] if preds.probs is not None else []
    if tops:
        rank = true_rank(preds.probs, y)
        for k in tops:
            rows.append(np.arange(total))
            cols.append(np.full(total, width))
            vals.append((rank < k).astype(np.float64))
            width += 1
    # [F, N]: feature by image, so that features @ counts.T is [F, resamples]
    features = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(cols), np.concatenate(rows))),
                                 shape=(width, total))

    rng = np.random.default_rng(seed)
    sums = np.empty((n, width))
    step = max(1, CHUNK // max(total, 1))
    for start in range(0, n, step):
        m = min(step, n - start)
        idx = rng.integers(0, total, size=(m, total))
        idx += np.arange(m)[:, None] * total  # one bincount counts every resample's images at once
        counts = np.bincount(idx.ravel(), minlength=m * total).reshape(m, total).astype(np.float64)
        sums[start:start + m] = (features @ counts.T).T

    support, predicted, hit = sums[:, :c], sums[:, c:2 * c], sums[:, 2 * c:3 * c]
    figures = {"accuracy": hit.sum(axis=1) / total}
    for j, k in enumerate(tops):
        figures[f"top{k}"] = sums[:, width - len(tops) + j] / total
    present = support > 0  # balanced accuracy: the mean recall of the classes with an image (scikit-learn's)
    figures["balanced_accuracy"] = np.where(present, hit / np.where(present, support, 1), 0).sum(axis=1) \
        / present.sum(axis=1)
    both = support + predicted  # F1 = 2 TP / (support + predicted), 0 for a class with neither (zero_division=0)
    figures["macro_f1"] = np.where(both > 0, 2 * hit / np.where(both > 0, both, 1), 0).mean(axis=1)
    if conf is not None:
        figures["ece"] = np.abs(sums[:, 3 * c:3 * c + ECE_BINS]).sum(axis=1) / total
    tail = (100 - LEVEL) / 2
    out: dict[str, Any] = {key: [float(v) for v in np.percentile(values, [tail, 100 - tail])]
                           for key, values in figures.items()}
    return {**out, "resamples": int(n), "seed": int(seed)}


def mcnemar(a_right: Any, b_right: Any) -> dict[str, Any]:
    """The 2x2 table of right/wrong pairs and the exact McNemar test's p-value (a binomial test on the
    discordant pairs; 1.0 when there are none)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_right, dtype=bool), np.asarray(b_right, dtype=bool)
    table = {"both_right": int((a & b).sum()), "a_only": int((a & ~b).sum()), "b_only": int((~a & b).sum()),
             "both_wrong": int((~a & ~b).sum())}
    discordant = table["a_only"] + table["b_only"]
    p = 1.0 if discordant == 0 else min(1.0, float(binomtest(table["a_only"], discordant, 0.5).pvalue))
    return {**table, "p_value": p}


def _matched(a: Predictions, b: Predictions, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Indices into a and b of the images both hold (a's order), and the paths only one holds."""
    for preds, name in ((a, names[0]), (b, names[1])):
        if preds.paths is None or not all(preds.paths):
            raise UsageError(f"{name} has no image paths: the comparison matches images by path",
                             hint="save predictions with evaluate --save-predictions (it writes the paths)")
        if len(set(preds.paths)) < len(preds.paths):
            raise UsageError(f"{name} lists an image twice: the comparison matches images by path")
    if list(a.classes) != list(b.classes):
        raise UsageError(f"{names[0]} and {names[1]} have different classes",
                         hint="compare models of the same classes, in the same order")
    where_b = {path: i for i, path in enumerate(b.paths)}
    ia = np.array([i for i, path in enumerate(a.paths) if path in where_b], dtype=np.int64)
    ib = np.array([where_b[a.paths[i]] for i in ia], dtype=np.int64)
    in_a = set(a.paths)
    only_a = [path for path in a.paths if path not in where_b]
    only_b = [path for path in b.paths if path not in in_a]
    if not len(ia):
        raise UsageError(f"{names[0]} and {names[1]} have no image in common", hint="the paths must be the same")
    differ = np.flatnonzero(np.asarray(a.labels)[ia] != np.asarray(b.labels)[ib])
    if len(differ):
        i = int(ia[differ[0]])
        raise UsageError(f"{a.paths[i]} is {a.classes[a.labels[i]]!r} in {names[0]} but "
                         f"{b.classes[b.labels[ib[differ[0]]]]!r} in {names[1]}: not the same test set")
    return ia, ib, only_a, only_b


def compare(a: Predictions, b: Predictions, names: Sequence[str] = ("A", "B")) -> dict[str, Any]:
    """Two models on the same images, matched by path: overall and per-class deltas (B - A) and McNemar's test."""
    from sklearn import metrics

    ia, ib, only_a, only_b = _matched(a, b, names)
    y = np.asarray(a.labels)[ia]
    pa, pb = np.asarray(a.predictions)[ia], np.asarray(b.predictions)[ib]
    labels = list(range(len(a.classes)))
    per = {}
    for key, p in (("a", pa), ("b", pb)):
        _, recall, f1, support = metrics.precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
        per[key] = (recall, f1)
    overall = {}
    for key, fn in (("accuracy", lambda p: metrics.accuracy_score(y, p)),
                    ("macro_recall", lambda p: metrics.recall_score(y, p, labels=labels, average="macro",
                                                                     zero_division=0)),
                    ("macro_f1", lambda p: metrics.f1_score(y, p, labels=labels, average="macro", zero_division=0))):
        va, vb = float(fn(pa)), float(fn(pb))
        overall[key] = {"a": va, "b": vb, "delta": vb - va}
    per_class = [{"class": name, "support": int(support[i]),
                  "recall_a": float(per["a"][0][i]), "recall_b": float(per["b"][0][i]),
                  "delta_recall": float(per["b"][0][i] - per["a"][0][i]),
                  "f1_a": float(per["a"][1][i]), "f1_b": float(per["b"][1][i]),
                  "delta_f1": float(per["b"][1][i] - per["a"][1][i])} for i, name in enumerate(a.classes)]
    notes = []
    if only_a or only_b:
        notes.append(f"{len(only_a)} images only in {names[0]} and {len(only_b)} only in {names[1]} "
                     f"are left out of the comparison ({len(ia)} in both)")
    return {"names": list(names), "images": int(len(ia)), "only_a": only_a, "only_b": only_b, **overall,
            "per_class": per_class, "mcnemar": mcnemar(pa == y, pb == y), "notes": notes}


COMPARE_COLUMNS = ("class", "support", "recall_a", "recall_b", "delta_recall", "f1_a", "f1_b", "delta_f1")


def compare_rows(comparison: dict[str, Any], text: bool = True) -> list[dict[str, Any]]:
    """The comparison's table: one row per class, then ``All`` (accuracy) and ``Macro``; deltas are B - A.

    Fractions as 4-decimal text (deltas signed), or with ``text=False`` numbers rounded to 4 decimals.
    """
    def _frac(value: float, signed: bool = False) -> Any:
        return (f"{value:+.4f}" if signed else f"{value:.4f}") if text else round(value, 4)

    def _row(name: str, support: int, ra: float, rb: float, fa: float, fb: float) -> dict[str, Any]:
        return {"class": name, "support": support, "recall_a": _frac(ra), "recall_b": _frac(rb),
                "delta_recall": _frac(rb - ra, True), "f1_a": _frac(fa), "f1_b": _frac(fb),
                "delta_f1": _frac(fb - fa, True)}

    rows = [_row(r["class"], r["support"], r["recall_a"], r["recall_b"], r["f1_a"], r["f1_b"])
            for r in comparison["per_class"]]
    acc, recall, f1 = comparison["accuracy"], comparison["macro_recall"], comparison["macro_f1"]
    n = comparison["images"]
    rows.append(_row("All", n, acc["a"], acc["b"], acc["a"], acc["b"]))  # micro recall and F1 are the accuracy
    rows.append(_row("Macro", n, recall["a"], recall["b"], f1["a"], f1["b"]))
    return rows
