"""Rendering records, progress bars, atomic files and the errors users see.

Everything here is light: importing it must not pull in torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

FORMATS = ("table", "json", "jsonl", "csv")

# Exit codes, one table for the whole tool.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class TorchtoolError(Exception):
    """An error a user can cause and fix; shown as one line, never a traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(TorchtoolError):
    """Bad arguments or inputs: exit 2."""

    exit_code = EXIT_USAGE


class Failure(TorchtoolError):
    """The work could not be done (no GPU, offline download, ...): exit 1."""

    exit_code = EXIT_FAILURE


def debug_enabled() -> bool:
    """True when tracebacks should be shown (``--debug`` or ``TORCHTOOL_DEBUG=1``)."""
    return os.environ.get("TORCHTOOL_DEBUG", "") not in ("", "0", "false", "no")


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal and never when NO_COLOR is set (no-color.org)."""
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def error_line(message: str, hint: str | None = None) -> str:
    """The one line (plus an optional hint line) a user sees for an error."""
    prefix = "torchtool: error:"
    if use_color(sys.stderr):
        prefix = f"\033[1;31m{prefix}\033[0m"
    text = f"{prefix} {message}"
    if hint:
        text += f"\n  hint: {hint}"
    return text


def warn(message: str) -> None:
    """A warning or log line on stderr, never on stdout."""
    print(f"torchtool: {message}", file=sys.stderr, flush=True)


# --- records -----------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def to_json(data: Any, indent: int | None = 2) -> str:
    """JSON text with stable key order; NaN/inf become null so any parser reads it."""
    return json.dumps(_jsonable(data), indent=indent, ensure_ascii=False)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v) for v in value)
    if isinstance(value, Mapping):
        return to_json(value, indent=None)
    return str(value)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Aligned plain-text table with a header line."""
    cols = _columns(rows, columns)
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def render_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV with a header row; nested values are written as compact JSON."""
    cols = _columns(rows, columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue().rstrip("\n")


def render_mapping(data: Mapping[str, Any], indent: int = 0) -> str:
    """A nested dict as aligned ``key: value`` lines, sections indented."""
    lines: list[str] = []
    width = max((len(str(k)) for k in data), default=0)
    pad = " " * indent
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            lines.append(f"{pad}{key}:")
            lines.append(render_mapping(value, indent + 2))
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
            lines.append(f"{pad}{key}:")
            for i, item in enumerate(value):
                lines.append(f"{pad}  [{i}]")
                lines.append(render_mapping(item, indent + 4))
        else:
            lines.append(f"{pad}{str(key).ljust(width)}  {_cell(value) if value != {} else ''}")
    return "\n".join(lines)


def render(data: Any, fmt: str = "table", columns: Sequence[str] | None = None) -> str:
    """Render a dict (one record) or a list of dicts in one of FORMATS."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"choose one of: {', '.join(FORMATS)}")
    is_rows = isinstance(data, (list, tuple))
    if fmt == "json":
        return to_json(data)
    if fmt == "jsonl":
        rows = data if is_rows else [data]
        return "\n".join(to_json(r, indent=None) for r in rows)
    if fmt == "csv":
        return render_csv(data if is_rows else [_flatten(data)], columns)
    if is_rows:
        return render_table(data, columns)
    return render_mapping(data)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> one flat record with dotted keys (for CSV of a single record)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def emit(data: Any, fmt: str = "table", columns: Sequence[str] | None = None) -> None:
    """Write rendered data to stdout: the only place commands put data."""
    text = render(data, fmt, columns)
    if text:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pick_format(fmt: str | None, json_flag: bool = False) -> str:
    """``--json`` is shorthand for ``--format json``."""
    return "json" if json_flag else (fmt or "table")


# --- progress ----------------------------------------------------------------


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", quiet: bool = False, **kwargs: Any):
    """A tqdm bar on stderr, shown only when stderr is a terminal and not ``quiet``."""
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, leave=False, **kwargs)


# --- files -------------------------------------------------------------------


def _file_mode(path: Path) -> int:
    """An existing file's permissions, else the umask's default for a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it.

    If the body raises, the temporary file is removed and any previous ``path`` is left
    untouched, so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give what open() would
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """``open()`` whose result appears at ``path`` only if the body finishes."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_save(path: str | os.PathLike, writer: Any) -> None:
    """Atomically write a file produced by ``writer(tmp_path)`` (torch.save, savefig, ...)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` was given."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists", hint="pass --overwrite to replace it")
    return path
