"""Devices, mixed precision, seeds, determinism, the torchrun process group, shared defaults.

Light to import (torch is imported inside the functions): the command line reads its
defaults from here. Every ``torch.distributed`` call the commands make is a method of
:class:`Dist`, a no-op when the process was not launched by torchrun.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torchtool.core.output import Failure, UsageError

# --- shared defaults (the options and the config dataclasses read them from here) ---------------

def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a job scheduler's share, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


DEFAULT_WORKERS = min(available_cpus(), 8)
# Inference batch: 16 on CPU (a smaller batch's activations stay in cache: 49 vs 40 images/s for
# resnet18 at 64), 64 on GPUs. Training keeps one default everywhere, so results do not depend on it.
INFER_BATCH = {"cpu": 16, "accelerator": 64}
TRAIN_BATCH = 64
# Past this no batch fits any memory; torch's samplers fail on one past sys.maxsize with an islice error.
MAX_BATCH = 1 << 20


def check_batch_size(batch_size: int | None) -> None:
    """A usage error for a batch size that no run can use (checked before anything is created)."""
    if batch_size is not None and not 1 <= batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size {batch_size} must be between 1 and {MAX_BATCH}")


def default_batch_size(device: Any) -> int:
    """The inference batch size for ``device`` (a torch.device or its type name)."""
    kind = getattr(device, "type", device)
    return INFER_BATCH["cpu" if kind == "cpu" else "accelerator"]



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


@contextlib.contextmanager
def determinism(deterministic: bool) -> Iterator[None]:
    """Deterministic algorithms and cuDNN, or cuDNN autotuning; torch's flags are restored afterwards."""
    import torch

    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    # warn_only: an op without a deterministic kernel warns instead of stopping a long run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def rng_state() -> dict[str, Any]:
    """python, numpy, torch and CUDA generator states as plain types and tensors (``weights_only`` loads them)."""
    import numpy as np
    import torch

    npst = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"key": npst["state"]["key"].tolist(), "pos": int(npst["state"]["pos"]),
                      "has_gauss": int(npst["has_gauss"]), "gauss": float(npst["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- torchrun ------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in a torchrun launch, and every collective the commands use.

    Outside torchrun it is rank 0 of 1 and each collective returns its input unchanged.
    """

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
        """Wait until every process gets here."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. an input list read once from stdin)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, totals: Any) -> list[float]:
        """Sum a tensor over processes, then read it back once: every rank gets the same numbers."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(totals)
        return totals.tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, indexed by rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, obj)
        return found


@contextlib.contextmanager
def distributed(device_spec: str = "auto") -> Iterator[Dist]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); leave it after."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device_spec != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_nccl else "gloo")
    try:
        yield Dist(rank, world, local)
    finally:
        if dist.is_initialized():
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
