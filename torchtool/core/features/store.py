"""On-disk feature output: one ``<layer>.npy`` per layer (written row by row), index.csv, meta.json.

Rows go into the .npy files with ``os.pwrite``, not through a memory map: written rows are
the kernel's page cache, not this process's memory (a memory map's pages count in its RSS,
~200 MB per 1,000 rows of resnet18's layer3), and a failed write is an OSError, not SIGBUS.
Readers load the files with ``numpy.load(mmap_mode="r")`` as usual.

Crash safety: feature rows are synced to disk before their row is marked done in
``.state/status.npy`` (0 pending, 1 ok, 2 skipped), and meta.json says
``"complete": true`` only after the last row. A rerun with the same settings resumes
from the status array, whatever the number of processes that wrote it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchtool.core.files import atomic_write_text, check_space, reserve, write_error
from torchtool.core.output import UsageError

PENDING, OK, SKIPPED = 0, 1, 2
STATE_DIR = ".state"
OFFSETS = "offsets.npy"  # a video run's: video i's frames are rows offsets[i]:offsets[i + 1]


def read_meta(out: Path) -> dict[str, Any] | None:
    """meta.json of an output folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prepare_output(out: Path, fingerprint: dict[str, Any], layer_names: Sequence[str], overwrite: bool) -> bool:
    """Decide between a fresh run and a resume; returns True when resuming (``layer_names``: the
    .npy files the run writes, by stem).

    Refuses to touch a finished output, or one written with other settings, unless
    ``overwrite``; then the previous torchtool files (and only those) are removed.
    """
    meta = read_meta(out)
    ours = [out / "meta.json", out / "index.csv", out / STATE_DIR]
    if meta is not None:
        ours += [out / f"{name}.npy" for name in meta.get("layers", {})]
        ours += [out / meta["offsets"]] if meta.get("offsets") == OFFSETS else []  # a video run's
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


class RowFile:
    """A .npy array of ``shape`` on disk, written and read by rows with pwrite/pread.

    ``create`` writes the header (numpy's own) and sizes the file; otherwise the existing
    file must hold exactly ``shape`` and ``dtype``. Several processes may write disjoint rows.
    A row is what the first ``row_dims`` dimensions index: with 2, row r of a [V, K, D] file
    is [r // K, r % K] (a video's K frames).
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any, create: bool, row_dims: int = 1):
        header = np.lib.format.open_memmap(path, mode="w+" if create else "r", dtype=dtype,
                                           shape=shape if create else None)
        if header.shape != tuple(shape) or header.dtype != np.dtype(dtype):
            raise UsageError(f"{path} holds {header.dtype}{list(header.shape)}, not {np.dtype(dtype)}{list(shape)}",
                             hint="pass --overwrite to start afresh")
        self.path, self.shape, self.dtype, self.offset = path, tuple(shape), np.dtype(dtype), header.offset
        del header  # only its layout was wanted: no mapping stays open
        self.row_shape = self.shape[row_dims:]  # one row's: a [V, K, D] file's rows are [D]
        self.n_rows = int(np.prod(self.shape[:row_dims], dtype=np.int64))
        self.row_bytes = self.nbytes(self.row_shape, self.dtype)
        self.fd = os.open(path, os.O_RDWR)
        if create:  # the space is taken now: a full disk fails here, not half-way through the run
            reserve(self.fd, self.offset + self.nbytes(self.shape, self.dtype), path)

    @staticmethod
    def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
        """The bytes of an array of ``shape`` (a file's size without its small header)."""
        return np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` (one row's shape) at row ``rows[i]``: one pwrite per run of consecutive rows.

        Anything else is a ValueError before a byte is written: a pwrite never reaches another row."""
        rows = np.asarray(rows, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=self.dtype)
        inside = not len(rows) or 0 <= rows.min() <= rows.max() < self.n_rows
        if values.shape != (len(rows), *self.row_shape) or not inside:
            raise ValueError(f"{self.path}: cannot write {list(values.shape)} at rows {rows.tolist()[:8]} of "
                             f"{self.n_rows} rows of {list(self.row_shape)}")
        values = values.reshape(len(rows), -1)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            data = memoryview(values[start:stop]).cast("B")
            offset = self.offset + int(rows[start]) * self.row_bytes
            while data:  # pwrite may write less than asked
                try:
                    written = os.pwrite(self.fd, data, offset)
                except OSError as exc:
                    raise write_error(exc, self.path) or exc from None
                data, offset = data[written:], offset + written

    def read(self) -> np.ndarray:
        """The whole array (small arrays only: the row status)."""
        size = self.nbytes(self.shape, self.dtype)
        return np.frombuffer(os.pread(self.fd, size, self.offset), dtype=self.dtype).reshape(self.shape)

    def sync(self) -> None:
        """Make the written rows durable (before their status says they are done)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FeatureStore:
    """Feature arrays, row status and per-process error logs in one output folder."""

    def __init__(self, out: Path, n_rows: int, shapes: dict[str, tuple[int, ...]], dtype: str,
                 create: bool, rank: int = 0, group: int = 1):
        """``group`` > 1 stores the rows as [n_rows / group, group, ...] (a video's segments)."""
        self.out = out
        self.state = out / STATE_DIR
        if create:
            needed = sum(RowFile.nbytes((n_rows, *shape), dtype) for shape in shapes.values())
            check_space(out, needed + n_rows, "the features")
            self.state.mkdir(parents=True, exist_ok=True)
        lead = (n_rows // group, group) if group > 1 else (n_rows,)
        self.arrays = {name: RowFile(out / f"{name}.npy", (*lead, *shape), dtype, create, row_dims=len(lead))
                       for name, shape in shapes.items()}
        self.status = RowFile(self.state / "status.npy", (n_rows,), np.uint8, create)
        self._errors = open(self.state / f"errors-{rank}.jsonl", "a", encoding="utf-8")

    def pending(self) -> np.ndarray:
        """Row indices not yet written."""
        return np.flatnonzero(self.status.read() == PENDING)

    def write(self, rows: np.ndarray, feats: dict[str, np.ndarray], bad: dict[int, str],
              notes: dict[int, str] | None = None) -> None:
        """Write good rows' features, NaN for bad rows, then mark them all done (in that order).

        ``notes`` are errors of good rows (a video pooled over the frames that decoded), kept
        in the error log like a bad row's."""
        bad_rows = np.fromiter(bad, dtype=np.int64, count=len(bad))
        for name, arr in self.arrays.items():
            if len(rows):
                arr.write(rows, feats[name])
            if bad:
                arr.write(bad_rows, np.full((len(bad), *arr.row_shape), np.nan, dtype=arr.dtype))
            arr.sync()
        for row, error in (bad | (notes or {})).items():
            self._errors.write(json.dumps({"row": int(row), "error": error}) + "\n")
        self._errors.flush()
        if len(rows):
            self.status.write(rows, np.full(len(rows), OK, dtype=np.uint8))
        if bad:
            self.status.write(bad_rows, np.full(len(bad), SKIPPED, dtype=np.uint8))

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
        """Rows ok, skipped and still pending, over every process's writes."""
        status = self.status.read()
        return {"ok": int((status == OK).sum()), "skipped": int((status == SKIPPED).sum()),
                "pending": int((status == PENDING).sum())}

    def close(self) -> None:
        """Close every file (the rows are on disk already)."""
        self._errors.close()
        for arr in [*self.arrays.values(), self.status]:
            arr.close()

    def write_index(self, paths: Sequence[Path]) -> Path:
        """index.csv: path,status,error for every row, in row order."""
        errors = self.errors()
        status = self.status.read()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "status", "error"])
        names = {OK: "ok", SKIPPED: "skipped", PENDING: "pending"}
        for row, path in enumerate(paths):
            writer.writerow([str(path), names[int(status[row])], errors.get(row, "") if status[row] == SKIPPED else ""])
        atomic_write_text(self.out / "index.csv", buf.getvalue(), errors="surrogateescape")  # paths byte for byte
        return self.out / "index.csv"

    def finish(self) -> None:
        """Drop the resume state once index.csv and meta.json say everything."""
        self.close()
        shutil.rmtree(self.state, ignore_errors=True)
