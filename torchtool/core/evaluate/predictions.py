"""Predictions and their files: ``--save-predictions`` writes them, ``--predictions`` reads them (``-``: stdin).

Columns ``label,prediction`` (class names or indices), optional ``score`` (the predicted
class's probability, for the calibration error; ``nan`` when unknown) and ``path``; other
columns are ignored. torchtool's own files add ``classes``: the class names in label order as
a JSON list, in the first row only. With it a file reads back exactly as it was written (a
class with no image, names such as ``01``, `` cat`` or ``10``); a file without it (another
tool's, an older torchtool's) reads as before: stripped names, sorted, or indices 0..max.

Every class's score (what AUC/AP, the loss and top-k need) travels in a companion file beside
the CSV, ``preds.csv`` -> ``preds.scores.npy``: float32 [N, C], rows in the CSV's order.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchtool.core.files import atomic_write, atomic_write_text, is_stream
from torchtool.core.output import UsageError

COLUMNS = ("path", "label", "prediction", "score", "classes")
SCORE_TOLERANCE = 1e-6  # a 6-decimal score against its float32 probability in the companion


@dataclass
class Predictions:
    """One prediction per image: label and prediction as class indices into ``classes``."""

    classes: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    scores: np.ndarray | None = None  # the predicted class's softmax probability
    paths: list[str] | None = None
    probs: np.ndarray | None = None  # [N, C] float32 softmax scores, row i = image i


def scores_path(path: str | os.PathLike) -> Path:
    """The companion of a prediction CSV that holds every class's score: ``preds.csv`` -> ``preds.scores.npy``."""
    path = Path(path)
    return path.with_name(f"{path.stem if path.suffix.lower() == '.csv' else path.name}.scores.npy")


def write_predictions(path: str | os.PathLike, preds: Predictions, all_scores: bool = False) -> Path | None:
    """``path,label,prediction,score,classes`` per image, class names; scores with 6 decimals (what evaluate uses).

    ``all_scores`` (and ``preds.probs``): every class's score too, in :func:`scores_path`, written
    first so a reader never finds the CSV without it. Returns the companion's path when written.
    """
    companion = None
    if all_scores and preds.probs is not None:
        if is_stream(path):
            raise UsageError(f"{path} is not a file: the scores of every class need a file beside it",
                             hint="save the predictions to a file")
        companion = scores_path(path)
        with atomic_write(companion, "wb") as fh:
            np.save(fh, np.ascontiguousarray(preds.probs, dtype=np.float32), allow_pickle=False)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    names, paths = preds.classes, preds.paths or [""] * len(preds.labels)
    scores = preds.scores if preds.scores is not None else [None] * len(preds.labels)
    stored = json.dumps(list(names), ensure_ascii=False)  # non-UTF-8 names stay their bytes, as in the other cells
    for i, (where, y, p, s) in enumerate(zip(paths, preds.labels, preds.predictions, scores)):
        writer.writerow([where, names[y], names[p], "" if s is None else f"{s:.6f}", "" if i else stored])
    atomic_write_text(path, buf.getvalue(), errors="surrogateescape")
    return companion


def read_class_names(spec: str) -> list[str]:
    """``--classes``: a text file with one class name per line (in label order) or a comma-separated list."""
    path = Path(spec).expanduser()
    names = path.read_text(errors="surrogateescape").splitlines() if path.is_file() else spec.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names or len(set(names)) < len(names):
        raise UsageError(f"--classes {spec}: expected distinct class names, one per line or comma-separated")
    return names


def _is_index(value: str) -> bool:
    return value.isdigit()


def _read_text(source: str) -> str:
    """The file (or stdin) as text: UTF-8 with or without a BOM (Excel's "CSV UTF-8"), other bytes kept."""
    if source == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        text = stdin.read().decode("utf-8", "surrogateescape") if stdin else sys.stdin.read()
        return text.removeprefix("\ufeff")
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"no such predictions file: {source}")
    return path.read_text(encoding="utf-8-sig", errors="surrogateescape")


def _stored_classes(cell: str | None, where: str) -> list[str]:
    """The ``classes`` cell of the first row: a JSON list of distinct names."""
    try:
        names = json.loads(cell or "")
    except ValueError:
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) \
            or len(set(names)) < len(names):
        raise UsageError(f"{where}: the 'classes' cell of line 2 is not a JSON list of distinct class names",
                         hint="torchtool writes it; drop the column to read the file by its labels alone")
    return names


def read_predictions(source: str, classes: list[str] | None = None) -> Predictions:
    """Read a prediction CSV; class names are ``classes`` when given, else the file's own ``classes``
    list, else sorted names (or indices 0..max). Its companion ``.scores.npy``, when beside it, gives ``probs``."""
    where = "stdin" if source == "-" else source
    reader = csv.DictReader(io.StringIO(_read_text(source)))
    found = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = found
    missing = [c for c in ("label", "prediction") if c not in found]
    if missing:
        raise UsageError(f"{where} has no {' or '.join(repr(c) for c in missing)} column",
                         hint=f"expected a header label,prediction[,score,path]; found: {','.join(found) or 'nothing'}")
    rows = list(reader)
    if not rows:
        raise UsageError(f"{where} holds no predictions")
    exact = classes is None and "classes" in found  # the names as written, spaces and all
    if exact:
        classes = _stored_classes(rows[0]["classes"], where)
    clean = (lambda v: v or "") if exact else (lambda v: (v or "").strip())
    raw = [clean(r["label"]) for r in rows], [clean(r["prediction"]) for r in rows]
    for column, values in zip(("label", "prediction"), raw):
        if "" in values:
            raise UsageError(f"{where}: empty {column} on line {values.index('') + 2}")
    values = set(raw[0]) | set(raw[1])
    if classes is None:
        if all(map(_is_index, values)):
            classes = [str(i) for i in range(max(map(int, values)) + 1)]
        else:
            classes = sorted(values)
    lookup = {name: i for i, name in enumerate(classes)}
    if not exact and all(map(_is_index, values)) and not values <= lookup.keys():  # indices into --classes
        lookup = {str(i): i for i in range(len(classes))}
    codes = []
    for column, col_values in zip(("label", "prediction"), raw):
        unknown = sorted(set(col_values) - lookup.keys())
        if unknown:
            line = col_values.index(unknown[0]) + 2
            raise UsageError(f"{where}: unknown {column} {unknown[0]!r} on line {line} ({len(unknown)} unknown in all)",
                             hint=f"the classes are: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        codes.append(np.array([lookup[v] for v in col_values], dtype=np.int64))
    scores = _scores(rows, where) if "score" in found else None
    paths = [r.get("path") or "" for r in rows] if "path" in found else None
    preds = Predictions(classes, codes[0], codes[1], scores, paths)
    companion = None if source == "-" else scores_path(Path(source).expanduser())
    if companion is not None and companion.is_file():
        preds.probs = _read_probs(companion, preds, where)
    return preds


def _read_probs(companion: Path, preds: Predictions, where: str) -> np.ndarray:
    """The companion's [N, C] scores, checked against the CSV: shape, values, and each row's own score."""
    hint = f"{companion.name} must be the file written with {Path(where).name}; move it away to read the CSV alone"
    try:
        probs = np.load(companion, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{companion} is not a .npy array of scores: {exc}", hint=hint) from None
    n, c = len(preds.labels), len(preds.classes)
    if probs.shape != (n, c) or probs.dtype.kind != "f":
        raise UsageError(f"{companion} holds {probs.dtype} scores of shape {list(probs.shape)}, but {where} has "
                         f"{n} predictions of {c} classes", hint=hint)
    probs = probs.astype(np.float32, copy=False)
    bad = ~(np.isfinite(probs) & (probs >= 0) & (probs <= 1))
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise UsageError(f"{companion}: row {row + 1} holds a score that is not a probability between 0 and 1",
                         hint=hint)
    if preds.scores is not None:  # a stale companion of the same shape must not pass for this file's
        own = probs[np.arange(n), preds.predictions].astype(np.float64)
        off = np.abs(own - preds.scores) > SCORE_TOLERANCE  # NaN (unknown) scores compare False: not checked
        if off.any():
            row = int(np.flatnonzero(off)[0])
            raise UsageError(f"{companion} does not belong to {where}: line {row + 2}'s score {preds.scores[row]:.6f} "
                             f"is not its predicted class's score there ({own[row]:.6f})", hint=hint)
    return probs


def _scores(rows: list[dict[str, str]], where: str) -> np.ndarray:
    """The score column: probabilities, or ``nan`` where the score is unknown (the report then has no ECE)."""
    try:
        scores = np.array([float(r["score"]) for r in rows], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(i for i, r in enumerate(rows) if not _is_float(r["score"]))
        raise UsageError(f"{where}: score {rows[bad]['score']!r} on line {bad + 2} is not a number") from None
    outside = ~(np.isnan(scores) | ((scores >= 0) & (scores <= 1)))
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise UsageError(f"{where}: score {rows[bad]['score']!r} on line {bad + 2} is not a probability between 0 and 1")
    return scores


def _is_float(value: str | None) -> bool:
    try:
        float(value or "")
        return True
    except ValueError:
        return False
