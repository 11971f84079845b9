"""The GPU side of gpu-reset behind one small interface: NVML, or a stand-in for machines without a GPU.

:class:`Nvml` is the real one (nvidia-ml-py). :class:`StandIn` reads a JSON description
named by ``TORCHTOOL_GPU_STANDIN`` and exists for the tests on machines without a GPU: it
reports real processes as GPU users, so the selection, the start-time guard and the
signalling run for real.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torchtool.core.gpu.proc import running
from torchtool.core.output import Failure

STANDIN_ENV = "TORCHTOOL_GPU_STANDIN"


@dataclass
class Gpu:
    """One GPU as the backend sees it."""

    index: int
    name: str
    used_bytes: int
    mig: bool = False
    display: bool = False
    minor: int | None = None  # N of its /dev/nvidiaN (the driver's numbering, not always the index)

    @property
    def device_number(self) -> int:
        return self.index if self.minor is None else self.minor


class Backend(Protocol):
    def gpus(self) -> list[Gpu]: ...

    def processes(self, index: int) -> list[tuple[int, int | None]]: ...  # (pid, used bytes)

    def device_prefix(self) -> str: ...


class Nvml:
    """The real GPUs, through NVML (nvidia-ml-py)."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError:
            raise Failure("nvidia-ml-py is not installed: NVML cannot be read",
                          hint="pip install nvidia-ml-py") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise Failure(f"no NVIDIA driver or NVML library here ({exc})",
                          hint="gpu-reset needs an NVIDIA GPU and its driver; see `torchtool env-info`") from None
        self.nvml = pynvml

    def _handle(self, index: int) -> Any:
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    def gpus(self) -> list[Gpu]:
        nv, found = self.nvml, []
        for i in range(nv.nvmlDeviceGetCount()):
            h = self._handle(i)
            name = nv.nvmlDeviceGetName(h)
            mig = display = False
            minor = None
            try:
                minor = int(nv.nvmlDeviceGetMinorNumber(h))
            except nv.NVMLError:
                pass
            try:
                mig = nv.nvmlDeviceGetMigMode(h)[0] == nv.NVML_DEVICE_MIG_ENABLE
            except nv.NVMLError:
                pass
            try:
                display = bool(nv.nvmlDeviceGetDisplayActive(h))
            except nv.NVMLError:
                pass
            found.append(Gpu(i, name.decode() if isinstance(name, bytes) else name,
                             int(nv.nvmlDeviceGetMemoryInfo(h).used), mig, display, minor))
        return found

    def processes(self, index: int) -> list[tuple[int, int | None]]:
        nv, h, seen = self.nvml, self._handle(index), {}
        for query in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in query(h):
                    used = p.usedGpuMemory
                    seen[int(p.pid)] = None if used in (None, getattr(nv, "NVML_VALUE_NOT_AVAILABLE", -1)) \
                        else int(used)
            except nv.NVMLError:
                pass
        return list(seen.items())

    def device_prefix(self) -> str:
        return "/dev/nvidia"


class StandIn:
    """GPUs described by a JSON file, for tests without a GPU (real processes, made-up memory).

    ``{"gpus": [{"name": "...", "base_bytes": N, "mig": false, "display": false, "minor": N,
    "processes": [{"pid": 123 | "self" | "parent", "used_bytes": N, "start_ticks": T}]}],
    "device_prefix": "/tmp/x/nvidia"}``: the processes' files named ``/tmp/x/nvidia0``... stand in for
    /dev/nvidia0... (see :func:`~torchtool.core.gpu.proc.open_devices`). A GPU's used memory is its base plus what its
    processes that still run use, so memory is "freed" when a process really ends.
    """

    def __init__(self, path: str):
        try:
            self.spec = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise Failure(f"{STANDIN_ENV}={path}: {exc}") from None

    def _procs(self, index: int) -> list[dict[str, Any]]:
        procs = []
        for p in self.spec["gpus"][index].get("processes", []):
            pid = {"self": os.getpid(), "parent": os.getppid()}.get(p["pid"], p["pid"])
            procs.append(p | {"pid": int(pid)})
        return procs

    def gpus(self) -> list[Gpu]:
        found = []
        for i, g in enumerate(self.spec["gpus"]):
            used = g.get("base_bytes", 0) + sum(p.get("used_bytes", 0) for p in self._procs(i) if running(p["pid"]))
            found.append(Gpu(i, g.get("name", "stand-in GPU"), used, g.get("mig", False), g.get("display", False),
                             g.get("minor")))
        return found

    def processes(self, index: int) -> list[tuple[int, int | None]]:
        return [(p["pid"], p.get("used_bytes")) for p in self._procs(index) if running(p["pid"])]

    def start_ticks(self, pid: int) -> int | None:
        """A start time the listing is to believe (to play a PID recycled since), when the JSON gives one."""
        for i in range(len(self.spec["gpus"])):
            for p in self._procs(i):
                if p["pid"] == pid and "start_ticks" in p:
                    return int(p["start_ticks"])
        return None

    def device_prefix(self) -> str:
        return self.spec.get("device_prefix", "/dev/nvidia")


def backend() -> Backend:
    """The stand-in when ``TORCHTOOL_GPU_STANDIN`` names one (tests), else NVML."""
    path = os.environ.get(STANDIN_ENV)
    return StandIn(path) if path else Nvml()
