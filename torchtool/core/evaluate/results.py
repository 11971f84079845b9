"""``--results-file``: one row per evaluated model, appended to a CSV or a JSON list (timm's results file).

Appending is read, add, replace atomically, under a lock on the folder: two evaluate runs
finishing at once (a scheduler's array job) both keep their rows, and a reader never sees
half a file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchtool.core.files import atomic_write_text, check_writable, is_stream
from torchtool.core.output import UsageError

RESULT_COLUMNS = ("checkpoint", "accuracy", "top5", "macro_f1", "ece", "loss", "images", "images_per_s", "error")
SUFFIXES = (".csv", ".json")


def _r4(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def result_row(label: str, report: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    """The row of one model: its headline figures (4 decimals), or the error that stopped it."""
    if report is None:
        return {**dict.fromkeys(RESULT_COLUMNS), "checkpoint": label, "error": error}
    top = report["top_k"] or {}
    return {"checkpoint": label, "accuracy": _r4(report["accuracy"]),
            "top5": _r4(top.get(f"top{min(5, report['classes'])}")),  # top-5 of 4 classes is top-4: all of them
            "macro_f1": _r4(report["averages"]["macro"]["f1"]), "ece": _r4(report["ece"]),
            "loss": _r4(report.get("loss")), "images": report["images"], "images_per_s": report.get("images_per_s"),
            "error": error}


def _existing(path: Path) -> str | None:
    """The file's text, None when there is none yet (or it is a stream: written through, never read)."""
    if is_stream(path) or not path.exists():
        return None
    return path.read_text(encoding="utf-8-sig", errors="surrogateescape")


def _rows_of(path: Path, text: str) -> list[Any]:
    """What the file holds: its data rows; a file of another shape is a usage error."""
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text) if text.strip() else []
        except ValueError:
            rows = None
        if not isinstance(rows, list):
            raise UsageError(f"--results-file {path} is not a JSON list", hint="give a new file, or one it wrote")
        return rows
    lines = list(csv.reader(io.StringIO(text)))
    if lines and tuple(lines[0]) != RESULT_COLUMNS:
        raise UsageError(f"--results-file {path} has other columns: {','.join(lines[0])[:200]}",
                         hint=f"give a new file, or one with the header {','.join(RESULT_COLUMNS)}")
    return lines[1:]


def check_results_file(spec: str) -> Path:
    """Before the run: a .csv or .json file that is new, or holds rows of this shape, in a folder we can write."""
    path = Path(spec).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--results-file {spec} must end in .csv or .json")
    check_writable(path, overwrite=True, what="--results-file")  # appended to, so an existing file is welcome
    if not path.parent.is_dir():
        raise UsageError(f"no such directory for {path}", hint="create the folder first")
    text = _existing(path)
    if text is not None:
        _rows_of(path, text)
    return path


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file left behind); the kernel drops it if we die."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def append_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """Add ``rows`` to the file: a CSV gets its header once, a JSON list is extended."""
    if is_stream(path):
        atomic_write_text(path, _render(path, [], rows), errors="surrogateescape")
        return
    with _folder_lock(path.parent):
        text = _existing(path)
        atomic_write_text(path, _render(path, _rows_of(path, text) if text else None, rows, text),
                          errors="surrogateescape")


def _render(path: Path, old: list[Any] | None, rows: list[dict[str, Any]], text: str | None = None) -> str:
    if path.suffix.lower() == ".json":
        return json.dumps([*(old or []), *rows], indent=2, ensure_ascii=False) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if not old:
        writer.writerow(RESULT_COLUMNS)
    writer.writerows([["" if r[c] is None else r[c] for c in RESULT_COLUMNS] for r in rows])
    prefix = text if old and text else ""
    if prefix and not prefix.endswith("\n"):
        prefix += "\n"
    return prefix + buf.getvalue()
