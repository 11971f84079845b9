"""Shared by the benchmark scripts: time commands in subprocesses, print medians and ratios."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def torchtool_exe() -> str:
    """The installed console script next to this interpreter (what users run)."""
    exe = Path(sys.executable).with_name("torchtool")
    if not exe.exists():
        raise SystemExit(f"{exe} not found: pip install -e . first")
    return str(exe)


def machine() -> str:
    from torchtool.core.env import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} logical cores, Python {platform.python_version()}, {platform.system()}"


def _run_once(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.decode()[-500:]}")
    return elapsed


def compare(ours: list[str], baseline: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock seconds of ``runs`` runs each, interleaved so drift hits both alike (after one warm-up each)."""
    _run_once(ours)
    _run_once(baseline)
    a: list[float] = []
    b: list[float] = []
    for _ in range(runs):
        a.append(_run_once(ours))
        b.append(_run_once(baseline))
    return a, b


def report(title: str, ours_label: str, ours: list[float], base_label: str, base: list[float], goal: float) -> None:
    mo, mb = statistics.median(ours), statistics.median(base)
    ratio = mb / mo
    width = max(len(ours_label), len(base_label))
    print(title)
    print(f"  machine: {machine()}")
    for label, times, med in ((ours_label, ours, mo), (base_label, base, mb)):
        print(f"  {label.ljust(width)}  median {med * 1000:7.0f} ms  (min {min(times) * 1000:.0f}, "
              f"max {max(times) * 1000:.0f}, {len(times)} runs)")
    verdict = "met" if ratio >= goal else "NOT met"
    print(f"  ratio: {ratio:.1f}x faster (goal: >= {goal:g}x, {verdict})")
