"""What may be ended, ending it (SIGTERM, then SIGKILL, start time checked before each signal), resetting."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchtool.core.gpu.nvml import Backend, Gpu, backend
from torchtool.core.gpu.proc import Holder, alive, describe_pid, device_file_holders, proc_start_ticks
from torchtool.core.output import UsageError

RESET_TIMEOUT = 120


def _protected() -> dict[int, str]:
    """This process, its parent chain and PID 1: never signalled."""
    keep, pid = {os.getpid(): "torchtool itself", 1: "PID 1 (init)"}, os.getppid()
    while pid > 1 and pid not in keep:
        keep[pid] = "a parent of torchtool"
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            break
    return keep


def find_holders(gpus: list[Gpu], nvml: Backend, all_users: bool, every_gpu: bool = True) -> list[Holder]:
    """Every process holding the selected GPUs, each with ``action`` "end" or "leave" and the reason.

    A process with device files open but no CUDA context is one row: on the first selected GPU
    whose /dev/nvidiaN it holds, or (with ``every_gpu``, no --gpu given) on none when it holds
    only /dev/nvidiactl or /dev/nvidia-uvm.
    """
    selected = {g.index for g in gpus}
    holders: dict[tuple[int | None, int], Holder] = {}
    for gpu in gpus:
        for pid, used in nvml.processes(gpu.index):
            holders[(gpu.index, pid)] = Holder(gpu.index, pid, "cuda", used)
    with_context = {pid for _, pid in holders}
    for pid, devices in device_file_holders(nvml.device_prefix()).items():
        if pid in with_context:
            continue
        mine = sorted(devices & selected)
        if mine or (every_gpu and devices <= {None}):
            holders[(mine[0] if mine else None, pid)] = Holder(mine[0] if mine else None, pid, "device file")
    keep, me, root = _protected(), os.geteuid(), os.geteuid() == 0
    believed = getattr(nvml, "start_ticks", lambda pid: None)
    for h in holders.values():
        if not describe_pid(h):
            h.action, h.reason = "leave", "not visible here (another PID namespace: a container's process?)"
            continue
        h.start_ticks = believed(h.pid) or h.start_ticks
        if h.pid in keep:
            h.action, h.reason = "leave", keep[h.pid]
        elif h.uid != me and not (all_users and root):
            h.action = "leave"
            h.reason = f"not yours (user {h.user}): " + ("pass --all-users to include it" if root
                                                          else "only root may end it, with --all-users")
        if h.kind == "device file" and h.action == "end":
            h.reason = "a /dev/nvidia* file open without a CUDA context (an orphaned worker?)"
    return sorted(holders.values(), key=lambda h: (-1 if h.gpu is None else h.gpu, h.pid))


def _signal(h: Holder, sig: int) -> bool:
    """Send ``sig`` if the PID is still the process listed (start time checked first)."""
    if proc_start_ticks(h.pid) != h.start_ticks:
        return False
    try:
        os.kill(h.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait(holders: list[Holder], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(h.pid, h.start_ticks) for h in holders) and time.monotonic() < deadline:
        time.sleep(0.05)


def end_holders(holders: list[Holder], timeout: float) -> None:
    """SIGTERM, ``timeout`` seconds, then SIGKILL to survivors; each target's ``result`` says what happened."""
    targets: dict[int, Holder] = {}  # one process on two GPUs is one row each, and signalled once
    for h in holders:
        if h.action == "end":
            targets.setdefault(h.pid, h)
    termed = []
    for h in targets.values():
        if not alive(h.pid, h.start_ticks):
            h.result = ("not signalled: the PID now belongs to another process (recycled)"
                        if proc_start_ticks(h.pid) is not None else "already gone")
            continue
        try:
            if _signal(h, signal.SIGTERM):
                termed.append(h)
            else:
                h.result = "not signalled: the PID now belongs to another process (recycled)"
        except PermissionError:
            h.result = "not signalled: permission denied"
    _wait(termed, timeout)
    survivors = []
    for h in termed:
        if not alive(h.pid, h.start_ticks):
            h.result = "ended (SIGTERM)"
        elif _signal(h, signal.SIGKILL):
            survivors.append(h)
    _wait(survivors, 5.0)
    for h in survivors:
        h.result = "still running after SIGKILL" if alive(h.pid, h.start_ticks) else "killed (SIGKILL)"
    for h in holders:
        if h.action == "end":
            h.result = targets[h.pid].result


def select_gpus(all_gpus: list[Gpu], wanted: list[int] | None) -> list[Gpu]:
    if not wanted:
        return all_gpus
    by_index = {g.index: g for g in all_gpus}
    missing = [i for i in wanted if i not in by_index]
    if missing:
        raise UsageError(f"--gpu {missing[0]}: there is no such GPU",
                         hint=f"GPUs here: {', '.join(map(str, by_index)) or 'none'}")
    return [by_index[i] for i in wanted]


def reset_gpu(gpu: Gpu, holders_left: int) -> str:
    """Run ``nvidia-smi --gpu-reset -i N`` when it is safe; else say exactly why not."""
    why = [reason for ok, reason in (
        (os.geteuid() == 0, "not root (nvidia-smi --gpu-reset needs root)"),
        (holders_left == 0, f"{holders_left} process(es) still hold it"),
        (not gpu.mig, "MIG is enabled on it"),
        (not gpu.display, "it drives a display"),
    ) if not ok]
    if why:
        return "not reset: " + "; ".join(why)
    program = shutil.which("nvidia-smi")
    if program is None:
        return "not reset: nvidia-smi is not installed"
    try:
        done = subprocess.run([program, "--gpu-reset", "-i", str(gpu.index)], capture_output=True, text=True,
                              timeout=RESET_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"not reset: nvidia-smi --gpu-reset did not finish in {RESET_TIMEOUT} s"
    text = (done.stdout + done.stderr).strip().splitlines()
    return "reset" if done.returncode == 0 else f"reset failed: {text[-1] if text else f'exit {done.returncode}'}"


@dataclass
class ResetPlan:
    """The listing: the selected GPUs and the processes holding them."""

    backend: Any
    gpus: list[Gpu]
    holders: list[Holder]
    before: dict[int, int] = field(default_factory=dict)


def plan(wanted: list[int] | None, all_users: bool) -> ResetPlan:
    """List who holds the selected GPUs, deciding what may be ended (nothing is signalled)."""
    if all_users and os.geteuid() != 0:
        raise UsageError("--all-users needs root", hint="run it as root, or leave --all-users out")
    nvml = backend()
    gpus = select_gpus(nvml.gpus(), wanted)
    return ResetPlan(nvml, gpus, find_holders(gpus, nvml, all_users, every_gpu=not wanted),
                     {g.index: g.used_bytes for g in gpus})


def execute(p: ResetPlan, timeout: float, reset: bool) -> list[dict[str, Any]]:
    """End the targets, then (with ``reset``) reset GPUs left idle; one summary record per GPU."""
    end_holders(p.holders, timeout)
    time.sleep(0.2)  # the driver frees a context's memory just after the process is gone
    after = {g.index: g for g in p.backend.gpus()}
    rows = []
    for g in p.gpus:
        now = after.get(g.index, g)
        left = len(p.backend.processes(g.index))
        rows.append({"gpu": g.index, "name": g.name, "used_before_bytes": p.before[g.index],
                     "used_after_bytes": now.used_bytes, "freed_bytes": p.before[g.index] - now.used_bytes,
                     "processes_left": left, "reset": reset_gpu(now, left) if reset else None})
    return rows
