"""profile's statistics: at least five timed blocks, verdicts only when the quartiles agree, busy-machine warnings."""

from __future__ import annotations

import time

import torch

from torchtool.core.inspect.timing import MIN_SAMPLES, Timing, busy_machine, measure
from torchtool.core.inspect.tips import verdict


def test_a_slow_call_is_timed_five_times_and_said_so():
    said = []
    timing = measure(lambda: time.sleep(0.02), torch.device("cpu"), 1, max_time=0.01, note=said.append)
    assert timing.runs >= timing.blocks == MIN_SAMPLES == 5
    assert timing.q1_s <= timing.median_s <= timing.q3_s and timing.median_s >= 0.02
    assert len(said) == 1 and "in --max-time 0.01: timing 5, about" in said[0]


def _timing(q1: float, median: float, q3: float) -> Timing:
    return Timing(median, q1, q3, 5, None)


def test_a_tip_is_faster_or_slower_only_when_its_range_excludes_1():
    base = _timing(10, 11, 12)
    assert verdict(base, _timing(5, 5.5, 6), True) == (10 / 6, 12 / 5, "faster")
    assert verdict(base, _timing(20, 21, 22), True)[2] == "slower"
    low, high, word = verdict(base, _timing(9, 10, 13), True)  # 1.1x at the medians, but the quartiles overlap
    assert low < 1 < high and word == "no clear difference"
    assert verdict(base, _timing(5, 5.5, 6), False)[2] == "outputs differ"  # fast but wrong is no speed-up


def test_a_busy_or_oversubscribed_machine_is_warned_about(monkeypatch):
    from torchtool.core.runtime import available_cpus

    cpus = available_cpus()
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert busy_machine(cpus) == []
    monkeypatch.setattr("os.getloadavg", lambda: (cpus + 3.0, 1.0, 1.0))
    (busy,) = busy_machine(cpus)
    assert f"load average {cpus + 3.0:.1f} on {cpus} CPUs" in busy
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    (over,) = busy_machine(cpus + 1)
    assert f"{cpus + 1} threads on {cpus} CPUs oversubscribe them" in over
