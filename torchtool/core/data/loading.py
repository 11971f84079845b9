"""Datasets that never raise on a bad file, loaders with the settings every command wants, samplers.

Each sample is ``(tensor, target, index, error)``; ``error`` is "" for a good image. Training
samples can be drawn under their own seed (:class:`SeededSamples`), so augmentations do not
depend on the number of workers or processes and a resumed run sees exactly the images an
uninterrupted one would.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import struct
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from torchtool.core.data.images import MAX_PIXELS, DecodeFloor, describe_error, load_image
from torchtool.core.output import warn
from torchtool.core.runtime import available_cpus


class ImageDataset:
    """Images by path (and optional targets) that never raise on a bad file.

    Each item is ``(tensor, target, index, error)``: ``error`` is "" for a good image;
    for a bad one the tensor is zeros of ``fallback_shape`` (and ``fallback_dtype``, the
    transform's output dtype) and ``error`` says why.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Any, targets: Sequence[int] | None = None,
                 fallback_shape: tuple[int, ...] = (3, 224, 224), max_pixels: int = MAX_PIXELS,
                 fallback_dtype: str = "float32", decode: DecodeFloor | None = None):
        self.paths = [str(p) for p in paths]
        self.targets = list(targets) if targets is not None else None
        self.transform = transform
        self.fallback_shape = fallback_shape
        self.fallback_dtype = fallback_dtype
        self.max_pixels = max_pixels
        self.decode = decode  # load_image's reduced JPEG decode (--fast-decode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int, str]:
        import torch

        target = self.targets[index] if self.targets is not None else -1
        try:
            img = load_image(self.paths[index], self.max_pixels, self.decode)
            return self.transform(img), target, index, ""
        except Exception as exc:  # any decoder failure is a bad input, not a crash
            return (torch.zeros(self.fallback_shape, dtype=getattr(torch, self.fallback_dtype)), target, index,
                    describe_error(exc))


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: die with the parent, and decode at a lower CPU priority than the model.

    A worker whose parent was SIGKILLed or OOM-killed would otherwise live on with its memory
    (Linux: PR_SET_PDEATHSIG ends it with the parent). On a machine with few cores the
    workers would preempt the forward pass's OpenMP threads mid-operation; niced, they fill
    the gaps instead.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before the line above: nobody is left to serve
            os._exit(1)
    try:
        os.nice(10)
    except OSError:
        pass


def cap_workers(workers: int) -> int:
    """``workers`` capped at the CPUs this process may use (more only compete with each other), with a note."""
    cpus = available_cpus()
    if workers <= cpus:
        return workers
    warn(f"--workers {workers} is more than the {cpus} CPU(s) available here: using {cpus}")
    return cpus


def make_loader(dataset: Any, batch_size: int, workers: int, *, sampler: Any = None,
                pin_memory: bool = False, drop_last: bool = False, seed: int | None = None) -> Any:
    """A DataLoader with the settings every command wants (persistent workers, prefetch, :func:`worker_init`)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      generator=generator, worker_init_fn=worker_init if workers > 0 else None)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (stable across runs and machines)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, epoch, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples:
    """Wraps a dataset so item ``(epoch, index)`` is drawn under its own seed.

    The epoch travels with the index (see :class:`EpochSampler`) because persistent
    workers hold their own copy of the dataset and never see attribute changes.
    """

    def __init__(self, dataset: Any, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        import torch

        epoch, index = key
        # CPU transforms draw from the default CPU generator only: seeding just that one costs ~2 us,
        # where torch.manual_seed (which also queues CUDA seeding) costs ~300 us a sample.
        generator = torch.default_generator
        saved = generator.get_state()  # leave the caller's generator as it was
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


class EpochSampler:
    """Yields ``(epoch, index)`` from an inner sampler that has ``set_epoch`` (DistributedSampler)."""

    def __init__(self, sampler: Any):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """This process's share of ``range(n)`` for evaluation: no padding, so sums stay exact."""
    return list(range(rank, n, world_size))
