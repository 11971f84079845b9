"""Records -> table/json/jsonl/csv/markdown, progress bars, the errors users see, exit codes.

Everything here is light: importing it must not pull in torch. Under torchrun only the
process of rank 0 writes records, log lines and progress bars (:func:`is_main_process`);
error lines come from every process.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import difflib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

FORMATS = ("table", "json", "jsonl", "csv", "markdown")

# Exit codes, one table for the whole tool.
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


def first_line(exc: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def is_main_process() -> bool:
    """False in the processes of rank 1, 2, ... under torchrun: they write no records or logs."""
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    """A warning or log line on stderr, never on stdout (rank 0 only under torchrun)."""
    if is_main_process():
        print(f"torchtool: {message}", file=sys.stderr, flush=True)


def info(message: str, quiet: bool = False) -> None:
    """A progress note ("resuming ...") on stderr: unlike a warning, ``--quiet`` silences it."""
    if not quiet:
        warn(message)


def suggest(name: str, choices: Sequence[str], n: int = 3) -> str:
    """'did you mean ...' text for a mistyped name ('' when nothing is close)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else ""


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
    """JSON text with stable key order; NaN/inf become null so any parser reads it.

    A file name that is not UTF-8 (Python keeps its bytes as lone surrogates) is written as a
    ``\\udcXX`` escape: valid JSON, and ``os.fsencode(json.loads(...))`` gives the bytes back.
    """
    text = json.dumps(_jsonable(data), indent=indent, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """A cell on one line: control characters (a newline or tab in a name) as escapes such as ``\\n``."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _width(text: str) -> int:
    """Terminal cells ``text`` takes: a CJK character or an emoji takes two (rich, which Typer brings,
    knows the table); a non-UTF-8 byte kept as a surrogate is shown as one."""
    from rich.cells import cell_len

    return cell_len(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Aligned plain-text table with a header line (aligned in terminal cells, one line per row)."""
    cols = _columns(rows, columns)
    table = [[_printable(str(c)) for c in cols]] + [[_printable(_cell(r.get(c))) for c in cols] for r in rows]
    widths = [max(_width(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v + " " * (w - _width(v)) for v, w in zip(row, widths)).rstrip() for row in table)


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
            lines.append(f"{pad}{str(key).ljust(width)}  {_printable(_cell(value)) if value != {} else ''}")
    return "\n".join(lines)


def _md(value: Any) -> str:
    shown = "none" if value is None or value == [] else _cell(value)
    return re.sub(r"([*_`|])", r"\\\1", shown)


def render_markdown(data: Any, columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """Rows as a Markdown table, a nested dict as a nested list; ``title`` folds it in <details>."""
    lines: list[str] = []
    if isinstance(data, (list, tuple)):
        cols = _columns(data, columns)
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_md(r.get(c)) for c in cols) + " |" for r in data]
    else:
        def walk(node: Mapping[str, Any], depth: int) -> None:
            pad = "  " * depth
            for key, value in node.items():
                if isinstance(value, Mapping):
                    lines.append(f"{pad}- **{key}**:" if value else f"{pad}- **{key}**: (none)")
                    walk(value, depth + 1)
                elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
                    lines.append(f"{pad}- **{key}**:")
                    lines.extend(f"{pad}  - " + ", ".join(f"{k}: {_md(v)}" for k, v in item.items()) for item in value)
                else:
                    lines.append(f"{pad}- {key}: {_md(value)}")

        walk(data, 0)
    if title:
        lines = [f"<details><summary>{title}</summary>", "", *lines, "", "</details>"]
    return "\n".join(lines)


def render(data: Any, fmt: str = "table", columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """Render a dict (one record) or a list of dicts in one of FORMATS (``title``: markdown's)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"choose one of: {', '.join(FORMATS)}")
    is_rows = isinstance(data, (list, tuple))
    if fmt == "markdown":
        return render_markdown(data, columns, title)
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


def emit(data: Any, fmt: str = "table", columns: Sequence[str] | None = None, title: str | None = None) -> None:
    """Write rendered data to stdout: the only place commands put data (rank 0 only under torchrun)."""
    if not is_main_process():
        return
    text = render(data, fmt, columns, title)
    if text:
        try:
            sys.stdout.write(text + "\n")
        except UnicodeEncodeError:  # a non-UTF-8 file name in a table or CSV: its own bytes, as ls shows them
            sys.stdout.flush()
            sys.stdout.buffer.write((text + "\n").encode(sys.stdout.encoding or "utf-8", "surrogateescape"))
    sys.stdout.flush()


def pick_format(fmt: str | None, json_flag: bool = False) -> str:
    """``--json`` is shorthand for ``--format json``."""
    return "json" if json_flag else (fmt or "table")


# --- progress ----------------------------------------------------------------


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", quiet: bool = False, **kwargs: Any):
    """A tqdm bar on stderr, shown only when stderr is a terminal (tqdm's ``disable=None``), not ``quiet``."""
    from tqdm.auto import tqdm

    disable = True if quiet or not is_main_process() else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, leave=False, **kwargs)
