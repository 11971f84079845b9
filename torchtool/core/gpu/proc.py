"""What /proc says of a process: owner, command, start time, kernel-thread flag, open /dev/nvidia* files."""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PF_KTHREAD = 0x00200000  # include/linux/sched.h: the process is a kernel thread


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


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after "(comm)": [0] is field 3 (state), [1] ppid, [6] flags, [19] starttime."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None when /proc does not show it."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in "ZX"


def alive(pid: int, start_ticks: int | None) -> bool:
    """The same process still runs (a zombie has ended; another start time is another process)."""
    return running(pid) and proc_start_ticks(pid) == start_ticks


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def kernel_thread(pid: int) -> bool:
    """PF_KTHREAD set, a child of kthreadd (PID 2), or no executable at all: a kernel thread."""
    fields = _stat(pid)
    if fields is None:
        return False
    if int(fields[6]) & PF_KTHREAD or (fields[1] == "2" and comm(2) == "kthreadd"):  # in a container, 2 is no kthreadd
        return True
    try:
        os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:  # a kernel thread has no mm; a zombie neither, but it runs no more
        return fields[0] not in "ZX"
    except OSError:  # another user's process, as a user: not a sign of anything
        pass
    return False


def comm(pid: int) -> str | None:
    """The kernel's name of the process (its executable's name, 15 bytes at most)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:
        return None


def owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def user_name(uid: int | None) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name if uid is not None else None
    except KeyError:
        return str(uid)


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
    holder.uid = owner(holder.pid)
    holder.user = user_name(holder.uid)
    try:
        raw = Path(f"/proc/{holder.pid}/cmdline").read_bytes()
        holder.command = " ".join(os.fsdecode(part) for part in raw.split(b"\0") if part) or None
    except OSError:
        pass
    return True


def open_devices(pid: int, prefix: str) -> set[int | None] | None:
    """The ``prefix``* files PID has open, as device numbers (None: nvidiactl, nvidia-uvm...); None if unreadable.

    The real prefix is /dev/nvidia; the tests name a folder of ordinary files instead, a stand-in
    for the device nodes, since what is read here is only the path each open file descriptor names.
    """
    found: set[int | None] = set()
    try:
        fds = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return None
    with fds:
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith(prefix):
                tail = target[len(prefix):]
                found.add(int(tail) if tail.isdigit() else None)
    return found


def device_file_holders(prefix: str) -> dict[int, set[int | None]]:
    """PIDs with a ``prefix``* file open (what ``fuser -v /dev/nvidia*`` shows) -> their device numbers.

    Only processes whose /proc/PID/fd this user may read are seen (all of them for root).
    """
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            devices = open_devices(int(entry.name), prefix)
            if devices:
                found[int(entry.name)] = devices
    return found
