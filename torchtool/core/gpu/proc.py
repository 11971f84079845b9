"""What /proc says of a process: owner, command line, start time, open /dev/nvidia* files."""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Holder:
    """A process holding a GPU, what /proc says of it, and what was decided and done."""

    gpu: int | None  # None: a device file of no single GPU (/dev/nvidiactl, /dev/nvidia-uvm)
    pid: int
    kind: str  # "cuda" (a context NVML reports) | "device file" (/dev/nvidia* open, no context)
    memory_bytes: int | None = None
    user: str | None = None
    uid: int | None = None
    command: str | None = None
    start_ticks: int | None = None  # clock ticks after boot (/proc/PID/stat field 22): identifies the process
    started: str | None = None
    action: str = "end"  # "end" | "leave"
    reason: str | None = None
    result: str | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("uid", "start_ticks")}


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None when /proc does not show it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)": state is 3, starttime 22


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def running(pid: int) -> bool:
    state = _state(pid)
    return state is not None and state not in "ZX"


def alive(pid: int, start_ticks: int | None) -> bool:
    """The same process still runs (a zombie has ended; another start time is another process)."""
    return running(pid) and proc_start_ticks(pid) == start_ticks


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def describe_pid(holder: Holder) -> bool:
    """Fill in owner, command and start time from /proc; False when this PID namespace does not show it."""
    ticks = proc_start_ticks(holder.pid)
    if ticks is None:
        return False
    holder.start_ticks = ticks
    started = _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    holder.started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    try:
        holder.uid = os.stat(f"/proc/{holder.pid}").st_uid
        holder.user = pwd.getpwuid(holder.uid).pw_name
    except (OSError, KeyError):
        holder.user = str(holder.uid) if holder.uid is not None else None
    try:
        raw = Path(f"/proc/{holder.pid}/cmdline").read_bytes()
        holder.command = " ".join(os.fsdecode(part) for part in raw.split(b"\0") if part) or None
    except OSError:
        pass
    return True


def device_file_holders(prefix: str) -> dict[int, set[int | None]]:
    """PIDs with a ``prefix``* device open (what ``fuser -v /dev/nvidia*`` shows) -> the GPUs those files are.

    Only processes whose /proc/PID/fd this user may read are seen (all of them for root).
    """
    found: dict[int, set[int | None]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith(prefix):
                    tail = target[len(prefix):]
                    found.setdefault(int(entry.name), set()).add(int(tail) if tail.isdigit() else None)
    return found
