"""Which holders gpu-reset may end, and why it leaves the others: the safety rules, in one place.

Each rule reads /proc afresh, so the same :meth:`Rules.judge` decides the listing and is asked
again just before SIGTERM (a process may have closed its device file, or exec'd a daemon, since).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torchtool.core.gpu.nvml import Backend, Gpu
from torchtool.core.gpu.proc import (Holder, comm, describe_pid, device_file_holders, kernel_thread, open_devices,
                                     owner, parent, user_name)

# Never ended, whoever runs gpu-reset: the driver's own services and what draws the screen.
SYSTEM_DAEMONS = {
    "nvidia-persistenced": "the NVIDIA persistence daemon",
    "nv-fabricmanager": "the NVIDIA fabric manager",
    "nv-hostengine": "the DCGM host engine",
    "nvidia-powerd": "the NVIDIA power daemon",
    "dcgm-exporter": "the DCGM exporter",
}
DISPLAY_SERVERS = ("Xorg", "X", "Xwayland", "gnome-shell", "kwin_wayland", "kwin_x11", "kwin", "plasmashell",
                   "mutter", "gnome-remote-desktop", "sway", "weston", "Hyprland", "gamescope", "cinnamon",
                   "xfwm4", "compiz")
# NVML readers: they hold /dev/nvidiaN (keeping the GPU awake) but no memory; ended only with --include-control
MONITORS = ("nvidia-smi", "nvtop", "nvitop", "gpustat", "nvidia-settings", "gmonitor")
COMM_LEN = 15  # /proc/PID/comm keeps the first 15 bytes of the executable's name
_DISPLAY_COMMS = frozenset(d[:COMM_LEN] for d in DISPLAY_SERVERS)  # the names as /proc shows them
_MONITOR_COMMS = frozenset(m[:COMM_LEN] for m in MONITORS)


def system_process(name: str | None) -> str | None:
    """Why a process of this /proc/PID/comm is a system daemon or a display server, or None."""
    for daemon, what in SYSTEM_DAEMONS.items():
        if name == daemon[:COMM_LEN]:
            return f"{what} ({daemon}): a system daemon, never ended"
    if name in _DISPLAY_COMMS:
        return f"a display server or desktop shell ({name}): never ended"
    return None


def protected() -> dict[int, str]:
    """This process, its whole parent chain and PID 1: never signalled."""
    keep, pid = {os.getpid(): "torchtool itself", 1: "PID 1 (init)"}, os.getppid()
    while pid and pid not in keep:  # 0: the parent lies outside this PID namespace
        keep[pid] = "a parent of torchtool"
        pid = parent(pid) or 0
    return keep


@dataclass
class Rules:
    """What the user asked for, and the facts the rules compare /proc with."""

    prefix: str  # /dev/nvidia (the tests name a stand-in folder)
    device_of: dict[int, int]  # GPU index -> N of its /dev/nvidiaN
    all_users: bool = False
    include_control: bool = False
    keep: dict[int, str] = field(default_factory=protected)
    me: int = field(default_factory=os.geteuid)

    def judge(self, h: Holder) -> str | None:
        """Why ``h`` must be left alone, or None when it may be ended."""
        if h.pid in self.keep:
            return self.keep[h.pid]
        if kernel_thread(h.pid):
            return "a kernel thread"
        name = comm(h.pid)
        system = system_process(name)
        if system:
            return system
        if name in _MONITOR_COMMS and not self.include_control:
            return f"a GPU monitor ({name}): pass --include-control to end it"
        uid = owner(h.pid)
        if uid is None:
            return "gone from /proc"
        if uid != self.me and not (self.all_users and self.me == 0):
            return f"not yours (user {user_name(uid)}): " + (
                "pass --all-users to include it" if self.me == 0 else "only root may end it, with --all-users")
        devices = open_devices(h.pid, self.prefix)
        if devices is None:
            return "its open files cannot be read in /proc: not verified to hold a GPU"
        if h.gpu is None:
            if not devices:
                return f"no {self.prefix}* file open any more"
            if not self.include_control:
                return ("holds only control devices (nvidiactl, nvidia-uvm), like a monitor: "
                        "pass --include-control to end it")
            return None
        wanted = f"{self.prefix}{self.device_of[h.gpu]}"
        if self.device_of[h.gpu] not in devices:
            if h.kind == "cuda":
                return (f"NVML reports it, but /proc shows no {wanted} open in it "
                        "(a PID of another PID namespace, such as the host's seen from a container?)")
            return f"no longer holds {wanted}"
        return None


def find_holders(gpus: list[Gpu], nvml: Backend, rules: Rules, every_gpu: bool = True) -> list[Holder]:
    """Every process holding the selected GPUs, each with ``action`` "end" or "leave" and the reason.

    A process with device files open but no CUDA context is one row: on the first selected GPU
    whose /dev/nvidiaN it holds, or (with ``every_gpu``, no --gpu given) on none when it holds
    only control devices (/dev/nvidiactl, /dev/nvidia-uvm).
    """
    gpu_of = {number: index for index, number in rules.device_of.items()}
    holders: dict[tuple[int | None, int], Holder] = {}
    for gpu in gpus:
        for pid, used in nvml.processes(gpu.index):
            holders[(gpu.index, pid)] = Holder(gpu.index, pid, "cuda", used)
    with_context = {pid for _, pid in holders}
    for pid, devices in device_file_holders(rules.prefix).items():
        if pid in with_context:
            continue
        mine = sorted(gpu_of[d] for d in devices if d in gpu_of)
        if mine or (every_gpu and devices <= {None}):
            holders[(mine[0] if mine else None, pid)] = Holder(mine[0] if mine else None, pid, "device file")
    believed = getattr(nvml, "start_ticks", lambda pid: None)
    for h in holders.values():
        if not describe_pid(h):
            h.action, h.reason = "leave", "not visible here (another PID namespace: a container's process?)"
            continue
        h.start_ticks = believed(h.pid) or h.start_ticks
        why = rules.judge(h)
        if why:
            h.action, h.reason = "leave", why
        elif h.kind == "device file":
            h.reason = ("only control devices open (--include-control)" if h.gpu is None
                        else "a /dev/nvidia* file open without a CUDA context (an orphaned worker?)")
    return sorted(holders.values(), key=lambda h: (-1 if h.gpu is None else h.gpu, h.pid))
