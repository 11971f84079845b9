"""Where the time goes: torch.profiler's operator table and Chrome/Perfetto trace, and a script under cProfile.

Script mode is what ``python -m torch.utils.bottleneck script.py`` does (cProfile and the
autograd profiler over one run of the script), without its re-runs and crashes: the script
runs once, in this process, as ``__main__`` with its own ``sys.argv``; its stdout goes to
stderr (``profile`` runs it under ``stdout_to_stderr``: stdout is for the tables); its exit
code and exception are reported; a child it forks ends when the script returns (it never
prints torchtool's tables); Ctrl-C ends the script and the tables cover the run so far.
"""

from __future__ import annotations

import contextlib
import cProfile
import json
import os
import pstats
import re
import runpy
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from torchtool.core.files import atomic_write
from torchtool.core.output import Failure, UsageError


def profiler(device: torch.device, memory: bool = True) -> Any:
    """torch.profiler over CPU (and CUDA) activities, with shapes and memory."""
    from torch.profiler import ProfilerActivity, profile

    # libkineto logs "profiler_start"/"profiler_stop" and, without a GPU, an ERROR line about the
    # device count on every run; it reads this when the first profile starts. A user's own setting wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=True, profile_memory=memory)


def top_ops(prof: Any, n: int, cuda: bool) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self time (CUDA time on a GPU), as records."""
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key, 0) for e in events) or 1
    rows = []
    for e in sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:n]:
        row = {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
               "cpu_total_ms": e.cpu_time_total / 1e3}
        if cuda:
            row["self_cuda_ms"] = getattr(e, "self_device_time_total", 0) / 1e3
        row["self_percent"] = 100 * getattr(e, key, 0) / total
        row["self_memory_bytes"] = getattr(e, "self_device_memory_usage" if cuda else "self_cpu_memory_usage", 0)
        rows.append(row)
    return rows


# How kineto ends a whole trace; a trace cut short by a failed write does not (the full parse decides otherwise).
_WHOLE_END = re.compile(rb'\]\s*,\s*"traceName"\s*:\s*"(?:[^"\\]|\\.)*"\s*\}\s*$')


def _whole(trace: str) -> bool:
    """Whether the JSON file ``trace`` was written to its end."""
    size = os.path.getsize(trace)
    with open(trace, "rb") as fh:
        fh.seek(max(0, size - (64 << 10)))
        if size and _WHOLE_END.search(fh.read()):
            return True
        fh.seek(0)
        try:
            json.load(fh)
        except ValueError:
            return False
    return True


def export_trace(prof: Any, path: Path) -> None:
    """The Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev), written atomically.

    torch's C++ writer ignores failed writes (a full disk gave an empty trace and exit 0), and it
    writes a file of its own beside the path it is given, then renames it. So it writes into a
    private temporary folder, the trace is checked to be whole, and Python copies it through the
    atomic path, whose failed writes are one line with the temporary file removed.
    """
    with tempfile.TemporaryDirectory(prefix="torchtool-trace-") as folder:
        written = os.path.join(folder, path.name)
        prof.export_chrome_trace(written)
        if not os.path.isfile(written) or not _whole(written):
            raise Failure(f"torch.profiler could not write the whole trace in {folder} (a full disk or a file size "
                          "limit?)",
                          hint="free some space there, or set TMPDIR to a folder with room, and rerun")
        with open(written, "rb") as src, atomic_write(path, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def profile_steps(fn: Callable[[], Any], device: torch.device, steps: int, top: int,
                  trace: Path | None) -> list[dict[str, Any]]:
    """Profile ``steps`` calls of ``fn`` (already warmed up): the top operators; the trace when asked."""
    with profiler(device) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace is not None:
        export_trace(prof, trace)
    return top_ops(prof, top, device.type == "cuda")


def check_script(path: str) -> Path:
    """The script to profile must exist (one line otherwise)."""
    script = Path(path)
    if not script.is_file():
        raise UsageError(f"no such script: {path}", hint="torchtool profile script.py -- ARGS...")
    return script


def _python_top(stats: cProfile.Profile, n: int) -> list[dict[str, Any]]:
    """cProfile's functions with the most self time (tottime), as records."""
    table = pstats.Stats(stats).stats  # (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in sorted(table.items(), key=lambda kv: kv[1][2],
                                                                       reverse=True)[:n]:
        where = name if file == "~" else f"{os.path.relpath(file) if not file.startswith('<') else file}:{line}({name})"
        rows.append({"function": where, "calls": calls, "self_s": tottime, "cumulative_s": cumtime})
    return rows


def _end_child(code: Any) -> None:
    """End a forked child as its own ``sys.exit`` would have, without running any more of torchtool."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def run_script(script: Path, args: list[str], top: int, trace: Path | None) -> dict[str, Any]:
    """Run ``script`` once under cProfile and torch.profiler: both top tables, its exit code and exception."""
    argv, path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.resolve().parent))  # as `python script.py` does
    python = cProfile.Profile()
    code, error = 0, None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pid = os.getpid()
    try:
        with profiler(device, memory=False) as prof:
            python.enable()
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
                if not isinstance(done.code, (int, type(None))):
                    error = f"SystemExit: {done.code}".splitlines()[0]
            except KeyboardInterrupt:
                code, error = 130, "KeyboardInterrupt (Ctrl-C): the tables cover the run until then"
            except Exception as exc:  # the script's own failure: its traceback is the user's to read
                traceback.print_exc(file=sys.stderr)
                code, error = 1, f"{type(exc).__name__}: {exc}".splitlines()[0]
            finally:
                if os.getpid() != pid:  # a child the script forked came back here: it is not torchtool
                    _end_child(code)
                python.disable()
    finally:
        sys.argv = argv
        if path0 is not None and sys.path and sys.path[0] == str(script.resolve().parent):
            sys.path.pop(0)
    if trace is not None:
        export_trace(prof, trace)
    return {"script": str(script), "args": args, "exit_code": code, "exception": error,
            "python_top": _python_top(python, top), "torch_top": top_ops(prof, top, device.type == "cuda")}
