"""THE inference loop: loader -> device -> normalise -> autocast -> model, and the bad-input rule.

Every command that runs a model over images (extract-features, finetune's validation,
evaluate, profile) iterates :func:`run`; the rule for unreadable inputs lives once, in
:class:`BadInputs`: skip them, remember why, or with ``--strict`` fail on the first.

    >>> bad = BadInputs(paths, strict=False)
    >>> for batch in run(model, loader, device, bad=bad, normalize=Normalize(mean, std, device)):
    ...     use(batch.indices[batch.good], batch.outputs)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchtool.core import runtime
from torchtool.core.data.images import MAX_PIXELS
from torchtool.core.data.loading import ImageDataset, cap_workers, make_loader
from torchtool.core.data.transforms import CenterCrop, Normalize
from torchtool.core.output import Failure
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
    dataset = ImageDataset(paths, CenterCrop(crop, preprocess.resize_size, preprocess.interpolation), targets,
                           fallback_shape=(crop, crop, 3), fallback_dtype="uint8", max_pixels=max_pixels,
                           decode_at_least=preprocess.resize_size if fast_decode else None)
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


@torch.inference_mode()
def run(model: Any, loader: Any, device: torch.device, *, bad: BadInputs, normalize: Any = None,
        amp: bool = False, channels_last: bool = True, bar: Any = None) -> Iterator[Batch]:
    """Run ``model`` over a loader of ``(images, targets, indices, errors)`` batches.

    ``normalize`` (e.g. :class:`~torchtool.core.data.transforms.Normalize`) turns uint8
    batches into the model's input on the device; without it the batch is moved as it is
    (channels_last for 4-D images). The model runs under ``inference_mode`` (only while the
    generator runs: the caller's code between batches is unaffected) and under autocast
    when ``amp``. ``bar`` is updated with every sample, good or not.
    """
    for images, targets, indices, errors in loader:
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
        if images.shape[0]:
            with autocast(device, amp):
                outputs = model(_to_device(images, device, normalize, channels_last))
        yield Batch(indices, good, batch_errors, targets, outputs)

