"""Prediction files: ``--save-predictions`` writes them, ``--predictions`` reads them (``-``: stdin).

Columns ``label,prediction`` (class names or indices), optional ``score`` (the predicted
class's probability, for the calibration error) and ``path``; other columns are ignored.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

import numpy as np

from torchtool.core.evaluate.report import Predictions
from torchtool.core.files import atomic_write_text
from torchtool.core.output import UsageError

COLUMNS = ("path", "label", "prediction", "score")


def write_predictions(path: str | os.PathLike, preds: Predictions) -> None:
    """``path,label,prediction,score`` per image, class names; scores with 6 decimals (what evaluate uses)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    names, paths = preds.classes, preds.paths or [""] * len(preds.labels)
    scores = preds.scores if preds.scores is not None else [None] * len(preds.labels)
    for where, y, p, s in zip(paths, preds.labels, preds.predictions, scores):
        writer.writerow([where, names[y], names[p], "" if s is None else f"{s:.6f}"])
    atomic_write_text(path, buf.getvalue(), errors="surrogateescape")


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


def read_predictions(source: str, classes: list[str] | None = None) -> Predictions:
    """Read a prediction CSV; class names are ``classes`` when given, else sorted names (or indices 0..max)."""
    where = "stdin" if source == "-" else source
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UsageError(f"no such predictions file: {source}")
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text))
    found = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = found
    missing = [c for c in ("label", "prediction") if c not in found]
    if missing:
        raise UsageError(f"{where} has no {' or '.join(repr(c) for c in missing)} column",
                         hint=f"expected a header label,prediction[,score,path]; found: {','.join(found) or 'nothing'}")
    rows = list(reader)
    if not rows:
        raise UsageError(f"{where} holds no predictions")
    raw = [(r["label"] or "").strip() for r in rows], [(r["prediction"] or "").strip() for r in rows]
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
    if all(map(_is_index, values)) and not values <= lookup.keys():  # indices into --classes
        lookup = {str(i): i for i in range(len(classes))}
    codes = []
    for column, col_values in zip(("label", "prediction"), raw):
        unknown = sorted(set(col_values) - lookup.keys())
        if unknown:
            line = col_values.index(unknown[0]) + 2
            raise UsageError(f"{where}: unknown {column} {unknown[0]!r} on line {line} ({len(unknown)} unknown in all)",
                             hint=f"the classes are: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        codes.append(np.array([lookup[v] for v in col_values], dtype=np.int64))
    scores = None
    if "score" in found:
        try:
            scores = np.array([float(r["score"]) for r in rows], dtype=np.float64)
        except (TypeError, ValueError):
            bad = next(i for i, r in enumerate(rows) if not _is_float(r["score"]))
            raise UsageError(f"{where}: score {rows[bad]['score']!r} on line {bad + 2} is not a number") from None
        if not ((scores >= 0) & (scores <= 1)).all():
            raise UsageError(f"{where}: scores must be probabilities between 0 and 1")
    paths = [r.get("path") or "" for r in rows] if "path" in found else None
    return Predictions(classes, codes[0], codes[1], scores, paths)


def _is_float(value: str | None) -> bool:
    try:
        float(value or "")
        return True
    except ValueError:
        return False
