"""Ending what the rules allow (SIGTERM, then SIGKILL, start time checked before each signal), resetting."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torchtool.core.gpu.nvml import Gpu, backend
from torchtool.core.gpu.proc import Holder, alive, proc_start_ticks
from torchtool.core.gpu.rules import Rules, find_holders
from torchtool.core.output import UsageError

RESET_TIMEOUT = 120
MAX_TIMEOUT = 600  # --timeout: a longer wait is a mistake (minutes, not seconds), not a plan


RECYCLED = "not signalled: the PID now belongs to another process (recycled)"
GONE = "already gone"


def _signal(h: Holder, sig: int, judge: Callable[[Holder], str | None] | None = None) -> str | None:
    """Send ``sig`` to the process listed, after checking its start time (and ``judge``); else why not.

    Through a pidfd where the kernel has them (Linux 5.3): once it is open, the checks and the
    signal concern one process, and a PID recycled in between cannot receive the signal.
    """
    try:
        fd = os.pidfd_open(h.pid)
    except ProcessLookupError:
        return GONE
    except OSError:  # an older kernel: the start-time check alone
        fd = None
    try:
        ticks = proc_start_ticks(h.pid)
        if ticks is not None and ticks != h.start_ticks:
            return RECYCLED
        if not alive(h.pid, h.start_ticks):
            return GONE
        why = judge(h) if judge else None
        if why:
            return f"not signalled: {why}"
        if fd is None:
            os.kill(h.pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return GONE
    except PermissionError:
        return "not signalled: permission denied"
    finally:
        if fd is not None:
            os.close(fd)
    return None


def _wait(holders: list[Holder], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(h.pid, h.start_ticks) for h in holders) and time.monotonic() < deadline:
        time.sleep(0.05)


def end_holders(holders: list[Holder], timeout: float, rules: Rules) -> None:
    """SIGTERM, ``timeout`` seconds, then SIGKILL to survivors; each target's ``result`` says what happened.

    The rules are asked again just before SIGTERM: what changed since the listing counts.
    """
    targets: dict[int, Holder] = {}  # one process on two GPUs is one row each, and signalled once
    for h in holders:
        if h.action == "end":
            targets.setdefault(h.pid, h)
    termed = []
    for h in targets.values():
        h.result = _signal(h, signal.SIGTERM, rules.judge)
        if h.result is None:
            termed.append(h)
    _wait(termed, timeout)
    survivors = []
    for h in termed:
        if alive(h.pid, h.start_ticks) and _signal(h, signal.SIGKILL) is None:
            survivors.append(h)
        else:  # gone before or while SIGKILL was being sent
            h.result = "ended (SIGTERM)"
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
    rules: Rules
    before: dict[int, int] = field(default_factory=dict)


def plan(wanted: list[int] | None, all_users: bool, include_control: bool = False,
         timeout: float = 10.0) -> ResetPlan:
    """List who holds the selected GPUs, deciding what may be ended (nothing is signalled)."""
    if not 0 <= timeout <= MAX_TIMEOUT:  # NaN too
        raise UsageError(f"--timeout {timeout:g}: give 0 to {MAX_TIMEOUT} seconds",
                         hint="the wait between SIGTERM and SIGKILL")
    if all_users and os.geteuid() != 0:
        raise UsageError("--all-users needs root", hint="run it as root, or leave --all-users out")
    nvml = backend()
    gpus = select_gpus(nvml.gpus(), wanted)
    rules = Rules(nvml.device_prefix(), {g.index: g.device_number for g in gpus}, all_users, include_control)
    return ResetPlan(nvml, gpus, find_holders(gpus, nvml, rules, every_gpu=not wanted), rules,
                     {g.index: g.used_bytes for g in gpus})


def execute(p: ResetPlan, timeout: float, reset: bool) -> list[dict[str, Any]]:
    """End the targets, then (with ``reset``) reset GPUs left idle; one summary record per GPU."""
    end_holders(p.holders, timeout, p.rules)
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
