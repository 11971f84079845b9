"""Real processes that gpu-reset's stand-ins report as GPU users (this machine has no NVIDIA driver).

``standin`` writes the JSON that ``TORCHTOOL_GPU_STANDIN`` names (the NVML side) and a folder
of ordinary files, ``.../dev/nvidia0``, ``nvidia1``, ``nvidiactl``, ``nvidia-uvm``, that the
proc layer is told to treat as the device nodes (``device_prefix``): a child that opens one is,
to /proc, a process holding that device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchtool.core import gpu

SLEEPS = "import time; print('ready', flush=True); time.sleep(3600)"
IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
               "time.sleep(3600)"
DEVICES = ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm")
PATIENCE = 1800.0  # seconds: a generous bound on waiting for a child to exec (a busy machine never reaches it)


def prefix(tmp_path: Path) -> str:
    """The stand-in for /dev/nvidia: a folder of plain files named like the device nodes."""
    folder = tmp_path / "dev"
    folder.mkdir(exist_ok=True)
    for name in DEVICES:
        (folder / name).touch()
    return str(folder / "nvidia")


def holding(tmp_path: Path, *tails: str, code: str = SLEEPS) -> str:
    """Python code that keeps ``prefix + tail`` open for each tail ("0", "ctl", "-uvm"), then runs ``code``."""
    return f"f = [open({prefix(tmp_path)!r} + t) for t in {tails!r}]; " + code


def standin(tmp_path: Path, gpus: list[dict], **extra) -> dict[str, str]:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": gpus, "device_prefix": prefix(tmp_path), **extra}))
    return {gpu.STANDIN_ENV: str(path)}


def wait_for_comm(pid: int, name: str) -> None:
    """Until the child has exec'd ``name`` (its /proc/PID/comm, 15 bytes at most)."""
    deadline = time.monotonic() + PATIENCE
    while gpu.proc.comm(pid) != name[:15]:
        assert time.monotonic() < deadline, f"{pid} never became {name}"
        time.sleep(0.01)


def named_sleep(tmp_path: Path, name: str) -> list[str]:
    """argv of /bin/sleep run under the name ``name`` (a symlink: comm comes from the name exec'd)."""
    link = tmp_path / "bin" / name
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(shutil.which("sleep"))
    return [str(link), "120"]


@pytest.fixture
def children():
    """start(code) runs ``python -c code`` (waits for its "ready"); start(argv=[...]) runs a program."""
    started: list[subprocess.Popen] = []

    def start(code: str = SLEEPS, argv: list[str] | None = None, **kwargs) -> subprocess.Popen:
        if argv:
            proc = subprocess.Popen(argv, **kwargs)
            started.append(proc)
            wait_for_comm(proc.pid, Path(argv[0]).name)
        else:
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **kwargs)
            started.append(proc)
            assert proc.stdout.readline().strip() == "ready"  # its files and handlers are in place
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
