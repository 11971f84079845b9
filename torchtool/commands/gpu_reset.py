"""torchtool gpu-reset: find what holds the GPUs, end only what is yours, reset a GPU only when nothing is left."""

import sys
from typing import Annotated, Optional

import typer

from torchtool.commands._options import Format, Json, Quiet
from torchtool.core import output


def run(
    gpu: Annotated[Optional[list[int]], typer.Option(
        "--gpu", "-g", metavar="ID", show_default=False, help="A GPU index; repeat for several (default: all).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Act without asking.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Only list; signal nothing.")] = False,
    timeout: Annotated[float, typer.Option(
        metavar="SECONDS", help="Seconds between SIGTERM and SIGKILL (0 to 600).")] = 10.0,
    all_users: Annotated[bool, typer.Option(
        "--all-users", help="As root: other users' processes too (otherwise only yours are ended).")] = False,
    include_control: Annotated[bool, typer.Option(
        "--include-control", help="Also end monitors (nvidia-smi, nvtop...) and processes holding only "
        "/dev/nvidiactl or /dev/nvidia-uvm (those listed when no --gpu is given).")] = False,
    reset: Annotated[bool, typer.Option(
        "--reset", help="Then run nvidia-smi --gpu-reset on each selected GPU nothing holds any more (root).")
    ] = False,
    format: Format = "table",
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    """List the processes holding GPU memory (NVML) or a /dev/nvidia* file (orphaned workers), then end yours.

    Only a process that /proc shows holding the GPU's /dev/nvidiaN is signalled (monitors and holders of control devices only with --include-control): SIGTERM, then SIGKILL after --timeout to survivors. Never torchtool itself, its parents or PID 1, kernel threads, the driver's daemons (nvidia-persistenced, nv-fabricmanager, nv-hostengine) or display servers, nor a PID whose start time changed since it was listed (a recycled PID); what is left alone is listed with the reason. Reports what ended and the memory freed per GPU. Without a terminal to confirm on, it lists and acts only with --yes.
    """
    from torchtool.core.gpu import execute, plan

    fmt = output.pick_format(format, json_)
    try:
        p = plan(gpu, all_users, include_control, timeout)
    except output.Failure as exc:  # no driver: a script reading --json still gets an object to parse
        if fmt == "json":
            output.emit({"processes": [], "gpus": None, "error": exc.message}, fmt)
        raise
    targets = [h for h in p.holders if h.action == "end"]
    act = not dry_run and (targets or reset)
    if act and not yes:
        if not sys.stdin.isatty():
            _show(p.holders, None, fmt)
            raise output.UsageError("no terminal to confirm on: nothing was signalled",
                                    hint="pass --yes to act, or --dry-run to only list")
        _show(p.holders, None, "table" if fmt == "table" else fmt)
        what = f"end {len(targets)} process(es) (SIGTERM, SIGKILL after {timeout:g} s)" if targets else ""
        what += (" and " if what else "") + ("reset the GPUs left idle" if reset else "")
        if not typer.confirm(f"{what}?", err=True):
            raise output.Failure("aborted: nothing was signalled")
    gpus = execute(p, timeout, reset) if act else None
    _show(p.holders, gpus, fmt)
    if any(h.result == "still running after SIGKILL" for h in p.holders) or \
            (reset and gpus and any(g["reset"] != "reset" for g in gpus)):
        raise typer.Exit(output.EXIT_FAILURE)


def _show(holders, gpus, fmt: str) -> None:
    from torchtool.core.files import human_bytes

    if fmt == "json":
        output.emit({"processes": [h.record() for h in holders], "gpus": gpus}, fmt)
        return
    rows = [h.record() for h in holders]
    if fmt in ("table", "markdown"):
        rows = [r | {"memory_bytes": human_bytes(r["memory_bytes"]) if r["memory_bytes"] is not None else "-",
                     "command": (r["command"] or "")[:60]} for r in rows]
    if rows:
        output.emit(rows, fmt)
    elif fmt in ("table", "markdown"):
        output.info("no process holds the selected GPUs")
    if gpus and fmt in ("table", "markdown"):
        output.emit([g | {k: human_bytes(g[k]) for k in ("used_before_bytes", "used_after_bytes", "freed_bytes")}
                     for g in gpus], fmt)
