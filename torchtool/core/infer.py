"""THE inference loop: loader -> device -> normalise -> autocast -> model, and the bad-input rule.

Every command that runs a model over images (extract-features, finetune's validation,
evaluate, profile) iterates :func:`run`; the rule for unreadable inputs lives once, in
:class:`BadInputs`: skip them, remember why, or with ``--strict`` fail on the first.

    >>> bad = BadInputs(paths, strict=False)
    >>> for batch in run(model, loader, device, bad=bad, normalize=Normalize(mean, std, device)):
    ...     use(batch.indices[batch.good], batch.outputs)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchtool.core import runtime
from torchtool.core.data.images import MAX_PIXELS, DecodeFloor
from torchtool.core.data.loading import ImageDataset, cap_workers, make_loader
from torchtool.core.data.transforms import CenterCrop, Normalize
from torchtool.core.output import Failure, info
from torchtool.core.runtime import autocast


class BadInputs:
    """Unreadable inputs met so far (dataset index -> reason), for one dataset.

    :meth:`check` applies the rule: with ``strict`` the first bad input fails the run,
    otherwise it is recorded and left out of the batch.
    """

    def __init__(self, paths: Sequence[str | Path], strict: bool):
        self.paths, self.strict = list(paths), strict
        self.errors: dict[int, str] = {}

    def check(self, indices: Sequence[int], errors: Sequence[str]) -> torch.Tensor | None:
        """None when every sample of the batch is good, else its bool mask of good samples."""
        if not any(errors):
            return None
        for index, error in zip(indices, errors):
            if error:
                if self.strict:
                    raise Failure(f"cannot read {self.paths[index]}: {error}",
                                  hint="drop --strict to skip unreadable inputs and keep going")
                self.errors[int(index)] = error
        return torch.tensor([not e for e in errors], dtype=torch.bool)

    def listed(self) -> list[tuple[Path | str, str]]:
        """(path, reason) of every bad input, in dataset order."""
        return [(self.paths[i], e) for i, e in sorted(self.errors.items())]


def image_loader(paths: Sequence[str | Path], preprocess: Any, device: torch.device, *,
                 targets: Sequence[int] | None = None, batch_size: int | None = None,
                 workers: int = runtime.DEFAULT_WORKERS, max_pixels: int = MAX_PIXELS,
                 pin_memory: bool | None = None, fast_decode: bool = False) -> tuple[Any, Normalize]:
    """(loader, normalize) for :func:`run`: workers decode and crop to uint8 (the weights' Resize +
    CenterCrop, 4x less to pass on than floats); the batch is normalised on the device.

    ``preprocess`` is a :class:`~torchtool.core.models.preprocess.Preprocess`; ``batch_size``
    None is the device's default; ``workers`` is capped at the CPUs; ``pin_memory`` None pins
    for CUDA; ``fast_decode`` decodes JPEGs at a reduced DCT scale that still covers the resize.
    """
    crop = preprocess.crop_size
    dataset = ImageDataset(paths, CenterCrop.of(preprocess), targets,
                           fallback_shape=(crop, crop, 3), fallback_dtype="uint8", max_pixels=max_pixels,
                           decode=DecodeFloor(preprocess.resize_size) if fast_decode else None)
    loader = make_loader(dataset, batch_size or runtime.default_batch_size(device), cap_workers(workers),
                         pin_memory=device.type == "cuda" if pin_memory is None else pin_memory)
    return loader, Normalize(preprocess.mean, preprocess.std, device)


@dataclass
class Batch:
    """One batch's result: ``outputs`` and ``targets`` cover the good samples only (``good`` marks them)."""

    indices: torch.Tensor  # dataset indices of every sample in the batch (CPU)
    good: torch.Tensor  # bool mask over ``indices`` (CPU)
    errors: dict[int, str]  # dataset index -> reason, this batch's bad samples
    targets: torch.Tensor  # the good samples' targets, on the device
    outputs: Any  # the model's output for the good samples; None when the batch had none


def _to_device(images: torch.Tensor, device: torch.device, normalize: Any, channels_last: bool) -> torch.Tensor:
    if normalize is not None:  # uint8 NHWC batches: one fused multiply-add on the device
        return normalize(images)
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@dataclass
class LoadWait:
    """How long THE loop waited for its batches: the measure of a loader-bound run.

    The first batch is kept apart (its wait includes starting the workers, which no loader
    setting removes); :attr:`fraction` is the share of the rest of the loop spent waiting.
    """

    first_s: float = 0.0  # the wait for the first batch
    waited_s: float = 0.0  # the waits for every later batch
    batches: int = 0
    samples: int = 0  # the samples after the first batch
    started: float = 0.0  # perf_counter when the loop started and ended
    ended: float = 0.0

    @property
    def total_s(self) -> float:
        """The whole loop's time, the first batch included (the rate a run reports)."""
        return max(self.ended - self.started, 0.0)

    @property
    def loop_s(self) -> float:
        """The loop's time after the first batch arrived."""
        return max(self.total_s - self.first_s, 0.0)

    @property
    def fraction(self) -> float:
        return self.waited_s / self.loop_s if self.loop_s > 0 else 0.0


BOTTLENECK = 0.2  # above this share of the loop spent waiting, loading is what limits the run


def loader_advice(wait: LoadWait, *, workers: int, fast_decode: bool, model: str = "MODEL",
                  min_loop_s: float = 1.0) -> str | None:
    """One line saying the loader was the bottleneck, with the figures and what may help; None otherwise.

    Said only when the loop ran at least ``min_loop_s`` over 3 or more batches after the first
    and waited more than :data:`BOTTLENECK` of it; ``workers`` is the number the loader had.
    """
    if wait.batches < 4 or wait.loop_s < min_loop_s or wait.fraction <= BOTTLENECK:
        return None
    cpus = runtime.available_cpus()
    tries = [] if fast_decode else ["--fast-decode (JPEGs decoded at a reduced scale)"]
    if workers < cpus:
        tries.append(f"--workers {cpus} (this run had {workers}; {cpus} CPUs are free)")
    tries.append(f"`torchtool profile {model} --dataloader DIR` to find the fastest --workers/--batch-size")
    rate = wait.samples / wait.loop_s
    return (f"loading was the bottleneck: the model waited for images {wait.fraction:.0%} of the loop "
            f"({wait.waited_s:.1f} s of {wait.loop_s:.1f} s, {rate:.1f} images/s); try " + ", ".join(tries))


def note_loader_bound(wait: LoadWait, loader: Any, *, fast_decode: bool, model: str, quiet: bool = False) -> None:
    """Say :func:`loader_advice`'s line on stderr, if there is one (``--quiet`` silences it)."""
    advice = loader_advice(wait, workers=loader.num_workers, fast_decode=fast_decode, model=model)
    if advice:
        info(advice, quiet)


@torch.inference_mode()
def run(model: Any, loader: Any, device: torch.device, *, bad: BadInputs, normalize: Any = None,
        amp: bool = False, channels_last: bool = True, bar: Any = None, wait: LoadWait | None = None,
        pad_to: int | None = None) -> Iterator[Batch]:
    """Run ``model`` over a loader of ``(images, targets, indices, errors)`` batches.

    ``normalize`` (e.g. :class:`~torchtool.core.data.transforms.Normalize`) turns uint8
    batches into the model's input on the device; without it the batch is moved as it is
    (channels_last for 4-D images). The model runs under ``inference_mode`` (only while the
    generator runs: the caller's code between batches is unaffected) and under autocast
    when ``amp``. ``bar`` is updated with every sample, good or not. ``wait`` (a
    :class:`LoadWait`) adds up the time spent waiting for each batch. ``pad_to`` runs every
    forward at that batch size (zeros fill a short batch, their outputs dropped): a sample's
    output then never depends on how many shared its batch, so one process and several, or a
    batch with unreadable inputs taken out, give the same bytes (a CPU convolution's last bits
    depend on the batch size).
    """
    wait = LoadWait() if wait is None else wait
    wait.started = time.perf_counter()
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        item = next(batches, None)
        now = time.perf_counter()
        if item is None:
            wait.ended = now
            return
        images, targets, indices, errors = item
        if wait.batches == 0:
            wait.first_s = now - asked
        else:
            wait.waited_s += now - asked
            wait.samples += len(errors)
        wait.batches += 1
        good = bad.check(indices.tolist(), errors)
        if bar is not None:
            bar.update(len(errors))
        if good is not None:
            images, targets = images[good], targets[good]
        else:
            good = torch.ones(len(errors), dtype=torch.bool)
        batch_errors = {int(i): e for i, e in zip(indices.tolist(), errors) if e}
        targets = targets.to(device, non_blocking=True)
        outputs = None
        if n := images.shape[0]:
            if pad_to and n < pad_to:
                images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
            with autocast(device, amp):
                outputs = model(_to_device(images, device, normalize, channels_last))
            if pad_to and n < pad_to:
                outputs = {k: v[:n] for k, v in outputs.items()} if isinstance(outputs, dict) else outputs[:n]
        yield Batch(indices, good, batch_errors, targets, outputs)
