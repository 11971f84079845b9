"""HeapTrimmer: trims when the process grows, and live memory never makes it trim on every call."""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest

from torchtool.core.runtime import HeapTrimmer

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and glibc")


@linux
def test_trims_once_then_takes_live_growth_as_the_new_baseline():
    trim = HeapTrimmer(slack_mb=8, warmup=1)
    trim()  # the baseline
    assert trim.trims == 0
    live = mmap.mmap(-1, 48 << 20)  # fresh pages, touched and alive: no trim can give them back
    for offset in range(0, len(live), mmap.PAGESIZE):
        live[offset] = 1
    trim()
    assert trim.trims == 1
    for _ in range(5):
        trim()
    assert trim.trims == 1  # the baseline rose with the live memory: no trim per batch
    live.close()


def test_without_glibc_it_does_nothing(monkeypatch):
    def no_libc(*_a, **_k):
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    trim = HeapTrimmer()
    for _ in range(10):
        trim()
    assert trim.trims == 0
