"""Timing a callable the way torch.utils.benchmark does, with the real thread count, and its peak memory.

``torch.utils.benchmark.Timer`` runs on one thread unless told otherwise (a trap: a 2-core
CPU looks half as fast); :func:`measure` always passes the thread count torch is using.
On CUDA the Timer synchronises around each block; peak memory is ``max_memory_allocated``
there and the growth of the process's peak RSS on the CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

WARMUP_S = 0.3  # also at least 2 calls: lazy init, oneDNN/cuDNN kernel selection, allocator growth
MIN_SAMPLES = 5  # fewer timed blocks make no median or quartiles: a slow call gets more than --max-time


@dataclass
class Timing:
    """A measurement of one call: median and quartiles over the Timer's blocks, and its peak memory."""

    median_s: float
    q1_s: float
    q3_s: float
    runs: int  # calls timed, in all
    peak_bytes: int | None
    blocks: int = 0  # the timed blocks the median and quartiles are taken over (at least MIN_SAMPLES)

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def record(self, batch_size: int) -> dict[str, Any]:
        """Milliseconds and samples/s (= batch size / median latency)."""
        return {"median_ms": self.median_s * 1e3, "iqr_ms": self.iqr_s * 1e3, "q1_ms": self.q1_s * 1e3,
                "q3_ms": self.q3_s * 1e3, "samples_per_s": batch_size / self.median_s, "runs": self.runs,
                "blocks": self.blocks,
                "peak_memory_bytes": self.peak_bytes}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the block: CUDA's allocator peak, or on the CPU how far the peak RSS rose above the RSS
    at the start (Linux resets the peak through /proc/self/clear_refs; elsewhere it is the process's peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.start = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif (hwm := _status_kib("VmHWM")) is not None:
            self.peak = max(0, hwm * 1024 - self.start)


def warm_up(fn: Callable[[], Any], device: torch.device, seconds: float = WARMUP_S) -> None:
    """Call ``fn`` at least twice and for ``seconds``."""
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, threads: int, max_time: float,
            note: Callable[[str], None] | None = None) -> Timing:
    """Warm ``fn`` up, then time it with ``Timer.adaptive_autorange`` (at most ``max_time`` seconds), and
    then at least MIN_SAMPLES blocks in all, however long they take (``note`` is told so)."""
    import logging

    # importing it imports cpp_extension, which logs "No CUDA runtime is found" on a CPU-only machine
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    warm_up(fn, device)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    with PeakMemory(device) as memory:
        m = timer.adaptive_autorange(threshold=0.1, min_run_time=min(0.05, max_time), max_run_time=max_time)
        times = list(m.times)
        if len(times) < MIN_SAMPLES:
            block = m.number_per_run * m.median
            if note and MIN_SAMPLES * block > max_time:  # said only when it runs past the budget
                more = (MIN_SAMPLES - len(times)) * block
                note(f"{len(times)} timed block(s) of {m.number_per_run} call(s) in --max-time {max_time:g}: timing "
                     f"{MIN_SAMPLES}, about {more:.2g} s more, for a median and quartiles")
            times += [timer.timeit(m.number_per_run).median for _ in range(MIN_SAMPLES - len(times))]
    times.sort()
    q1, q3 = _quantile(times, 0.25), _quantile(times, 0.75)
    return Timing(_quantile(times, 0.5), q1, q3, m.number_per_run * len(times), memory.peak, len(times))


def busy_machine(threads: int) -> list[str]:
    """Warnings for a machine where timings are unreliable: a load above the CPUs, threads above the CPUs."""
    from torchtool.core.runtime import available_cpus

    cpus, said = available_cpus(), []
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    if load > cpus:
        said.append(f"the machine is busy (load average {load:.1f} on {cpus} CPUs): timings are slower and "
                    "noisier than on an idle machine")
    if threads > cpus:
        said.append(f"{threads} threads on {cpus} CPUs oversubscribe them: timings suffer (--threads {cpus} "
                    "or fewer)")
    return said


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
