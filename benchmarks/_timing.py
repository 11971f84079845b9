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


def compare(ours: list[str], *baselines: list[str], runs: int) -> tuple[list[float], ...]:
    """Wall-clock seconds of ``runs`` runs of each command, interleaved so drift hits all alike.

    One warm-up run each first; returns one list per command, ``ours`` first.
    """
    commands = [ours, *baselines]
    for argv in commands:
        _run_once(argv)
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(runs):
        for argv, out in zip(commands, times):
            out.append(_run_once(argv))
    return tuple(times)


def report(title: str, ours_label: str, ours: list[float], base_label: str, base: list[float], goal: float) -> bool:
    """One baseline: the medians and their ratio against ``goal``; True when the goal is met."""
    return report_many(title, ours_label, ours, [(base_label, base, "")], goal)


def report_many(title: str, ours_label: str, ours: list[float], baselines: list[tuple[str, list[float], str]],
                goal: float, judged_on: int = 0) -> bool:
    """Medians of ``ours`` and of each (label, times, what the ratio includes); one ratio per baseline.

    The goal is judged on ``baselines[judged_on]`` alone (the return value: met or not); the other
    ratios are printed beside it.
    """
    mo = statistics.median(ours)
    rows = [(ours_label, ours)] + [(label, times) for label, times, _ in baselines]
    width = max(len(label) for label, _ in rows)
    print(title)
    print(f"  machine: {machine()}")
    for label, times in rows:
        print(f"  {label.ljust(width)}  median {statistics.median(times) * 1000:7.0f} ms  (min {min(times) * 1000:.0f}, "
              f"max {max(times) * 1000:.0f}, {len(times)} runs)")
    for i, (label, times, note) in enumerate(baselines):
        ratio = statistics.median(times) / mo
        about = f" against {label}" if len(baselines) > 1 else ""
        verdict = f"goal: >= {goal:g}x, {'met' if ratio >= goal else 'NOT met'}" if i == judged_on else "not judged"
        print(f"  ratio{about}: {ratio:.1f}x faster ({verdict}){'; ' + note if note else ''}")
    return statistics.median(baselines[judged_on][1]) / mo >= goal
