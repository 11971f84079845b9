"""Devices, mixed precision, seeds and the torchrun process group, shared by every command."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any

from torchtool.core.output import Failure, UsageError


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> Any:
    """``auto|cpu|cuda|cuda:N|mps`` -> torch.device, failing clearly when it is not there.

    Under torchrun, ``auto``/``cuda`` mean this process's GPU (LOCAL_RANK).
    """
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise Failure("--device mps: MPS is not available on this machine", hint="use --device cpu")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise Failure(f"--device {spec}: CUDA is not available (no GPU or driver visible)",
                          hint="use --device cpu, or check `torchtool env-info`")
        index = int(spec.split(":")[1]) if ":" in spec else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise Failure(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible",
                          hint="indices count from 0 and respect CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", index)
    raise UsageError(f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps")


def amp_dtype(device: Any) -> Any:
    """The autocast dtype that helps on ``device``: bf16 where supported, else fp16."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def autocast(device: Any, enabled: bool) -> Any:
    """``torch.autocast`` for ``device`` when enabled, else a no-op context."""
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_spec: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device_spec != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return Dist(rank, world, local)


def close_distributed() -> None:
    """Leave the process group cleanly (no-op outside torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class HeapTrimmer:
    """Call once per batch: hands freed heap memory back to the OS when the process has grown.

    On CPU, glibc keeps the freed activation buffers of each forward pass in its arenas, and
    depending on the order of frees a long run's RSS can creep up by hundreds of MB with
    nothing alive. After ``warmup`` calls the RSS is the baseline; whenever it exceeds that by
    ``slack_mb``, ``malloc_trim(0)`` returns the free pages (rarely: a trim that cannot bring
    it down raises the baseline instead). A no-op where there is no glibc or no /proc.
    """

    def __init__(self, slack_mb: int = 32, warmup: int = 4):
        import ctypes

        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._rss()
        except (OSError, AttributeError, ValueError):
            self._trim = None
        self.slack, self.warmup = slack_mb << 20, warmup
        self.calls = self.trims = self.baseline = 0

    def _rss(self) -> int:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * self._page

    def __call__(self) -> None:
        if self._trim is None:
            return
        self.calls += 1
        rss = self._rss()
        if self.calls <= self.warmup:
            self.baseline = max(self.baseline, rss)
        elif rss > self.baseline + self.slack:
            self._trim(0)
            self.trims += 1
            self.baseline = max(self.baseline, self._rss())
