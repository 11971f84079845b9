"""On-disk feature output: one memory-mapped ``<layer>.npy`` per layer, index.csv, meta.json.

Crash safety: feature rows are flushed before their row is marked done in
``.state/status.npy`` (0 pending, 1 ok, 2 skipped), and meta.json says
``"complete": true`` only after the last row. A rerun with the same settings resumes
from the status array, whatever the number of processes that wrote it.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchtool.core.files import atomic_write_text
from torchtool.core.output import UsageError

PENDING, OK, SKIPPED = 0, 1, 2
STATE_DIR = ".state"


def read_meta(out: Path) -> dict[str, Any] | None:
    """meta.json of an output folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_output(out: Path, fingerprint: dict[str, Any], layer_names: Sequence[str], overwrite: bool) -> bool:
    """Decide between a fresh run and a resume; returns True when resuming.

    Refuses to touch a finished output, or one written with other settings, unless
    ``overwrite``; then the previous torchtool files (and only those) are removed.
    """
    meta = read_meta(out)
    ours = [out / "meta.json", out / "index.csv", out / STATE_DIR]
    if meta is not None:
        ours += [out / f"{name}.npy" for name in meta.get("layers", {})]
    if overwrite:
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return False
    if meta is None:
        clash = [out / f"{n}.npy" for n in layer_names if (out / f"{n}.npy").exists()]
        if clash:
            raise UsageError(f"{clash[0]} already exists and is not from a torchtool run",
                             hint="pass --overwrite, or choose another --out")
        return False
    if meta.get("complete"):
        raise UsageError(f"{out} already holds a finished extraction", hint="pass --overwrite to redo it, or another --out")
    if meta.get("fingerprint") != fingerprint:
        raise UsageError(f"{out} holds an unfinished extraction with different settings or inputs",
                         hint="rerun the same command to resume it, or pass --overwrite to start fresh")
    # Killed before the first row was recorded: nothing to resume, start again.
    return (out / STATE_DIR / "status.npy").exists()


class FeatureStore:
    """Memory-mapped feature arrays, row status and per-process error logs in one folder."""

    def __init__(self, out: Path, n_rows: int, shapes: dict[str, tuple[int, ...]], dtype: str,
                 create: bool, rank: int = 0):
        self.out = out
        self.state = out / STATE_DIR
        mode = "w+" if create else "r+"
        if create:
            self.state.mkdir(parents=True, exist_ok=True)
        self.arrays = {name: np.lib.format.open_memmap(out / f"{name}.npy", mode=mode, dtype=dtype,
                                                       shape=(n_rows, *shape))
                       for name, shape in shapes.items()}
        self.status = np.lib.format.open_memmap(self.state / "status.npy", mode=mode, dtype=np.uint8,
                                                shape=(n_rows,))
        self._errors = open(self.state / f"errors-{rank}.jsonl", "a", encoding="utf-8")

    def pending(self) -> np.ndarray:
        """Row indices not yet written."""
        return np.flatnonzero(np.asarray(self.status) == PENDING)

    def write(self, rows: np.ndarray, feats: dict[str, np.ndarray], bad: dict[int, str]) -> None:
        """Write good rows' features, NaN for bad rows, then mark them all done (in that order)."""
        for name, arr in self.arrays.items():
            if len(rows):
                arr[rows] = feats[name]
            if bad:
                arr[np.fromiter(bad, dtype=np.int64)] = np.nan
            arr.flush()
        for row, error in bad.items():
            self._errors.write(json.dumps({"row": int(row), "error": error}) + "\n")
        self._errors.flush()
        self.status[rows] = OK
        if bad:
            self.status[np.fromiter(bad, dtype=np.int64)] = SKIPPED
        self.status.flush()

    def errors(self) -> dict[int, str]:
        """Every process's recorded errors by row (the latest wins)."""
        found: dict[int, str] = {}
        for log in sorted(self.state.glob("errors-*.jsonl")):
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                found[int(rec["row"])] = rec["error"]
        return found

    def counts(self) -> dict[str, int]:
        status = np.asarray(self.status)
        return {"ok": int((status == OK).sum()), "skipped": int((status == SKIPPED).sum()),
                "pending": int((status == PENDING).sum())}

    def close(self) -> None:
        self._errors.close()
        for arr in self.arrays.values():
            arr.flush()
        self.status.flush()

    def write_index(self, paths: Sequence[Path]) -> Path:
        """index.csv: path,status,error for every row, in row order."""
        errors = self.errors()
        status = np.asarray(self.status)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "status", "error"])
        names = {OK: "ok", SKIPPED: "skipped", PENDING: "pending"}
        for row, path in enumerate(paths):
            writer.writerow([str(path), names[int(status[row])], errors.get(row, "") if status[row] == SKIPPED else ""])
        atomic_write_text(self.out / "index.csv", buf.getvalue())
        return self.out / "index.csv"

    def finish(self) -> None:
        """Drop the resume state once index.csv and meta.json say everything."""
        self.close()
        shutil.rmtree(self.state, ignore_errors=True)
