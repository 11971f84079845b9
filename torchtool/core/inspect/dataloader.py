"""The cookbook's "find the fastest num_workers by experiment", done: a sweep of loader settings over a folder.

The images are loaded exactly as extract-features and evaluate load them (``infer.image_loader``:
decode, the model's resize and center crop to uint8 in the workers, normalised on the device),
without the model, for each number of workers, batch size and (on CUDA) pin_memory setting.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from torchtool.core.data.images import MAX_PIXELS, find_images
from torchtool.core.infer import image_loader
from torchtool.core.output import Failure
from torchtool.core.runtime import available_cpus


def worker_counts(cpus: int) -> list[int]:
    """0, 1, 2, 4, ... up to and including the CPU count."""
    counts, n = [0], 1
    while n < cpus:
        counts.append(n)
        n *= 2
    return counts + [cpus]


def batch_sizes(batch: int) -> list[int]:
    """Half, the same and twice the model's batch size."""
    return sorted({max(1, batch // 2), batch, batch * 2})


def _one(paths: list[Any], preprocess: Any, device: torch.device, batch: int, workers: int, pin: bool,
         max_pixels: int) -> dict[str, Any]:
    """Images/s of one pass over ``paths`` (worker start-up included: what each run pays)."""
    started = time.perf_counter()
    loader, normalize = image_loader(paths, preprocess, device, batch_size=batch, workers=workers,
                                     max_pixels=max_pixels, pin_memory=pin)
    seen = decoded = 0
    for images, _, _, errors in loader:
        normalize(images)
        seen += len(images)
        decoded += sum(not e for e in errors)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    del loader  # persistent workers end here
    return {"workers": workers, "batch_size": batch, "pin_memory": pin, "images": seen, "decoded": decoded,
            "seconds": elapsed, "images_per_s": seen / elapsed}


def sweep(folder: str, preprocess: Any, device: torch.device, batch: int, max_images: int,
          max_pixels: int = MAX_PIXELS, on_row: Any = None) -> dict[str, Any]:
    """Every setting's images/s over (up to ``max_images`` of) ``folder``, and the fastest."""
    paths = find_images([folder])[:max_images]
    pins = [False, True] if device.type == "cuda" else [False]
    rows = []
    for workers in worker_counts(available_cpus()):
        for size in batch_sizes(batch):
            for pin in pins:
                if on_row:
                    on_row(f"workers {workers}, batch {size}")
                rows.append(_one(paths, preprocess, device, size, workers, pin, max_pixels))
                if not rows[-1]["decoded"]:  # timing failures is no measure of loading
                    raise Failure(f"--dataloader {folder}: none of the {len(paths)} images could be decoded",
                                  hint="check the images: extract-features lists why each one fails")
    fastest = max(rows, key=lambda r: r["images_per_s"])
    at_batch = max((r for r in rows if r["batch_size"] == batch), key=lambda r: r["images_per_s"])
    return {"folder": folder, "images": len(paths), "crop_size": preprocess.crop_size, "rows": rows,
            "fastest": fastest, "fastest_at_batch_size": at_batch}


def bottleneck(loading: dict[str, Any], forward_samples_per_s: float, batch: int) -> str:
    """Which side would hold the other up at ``batch``: the loader's best setting or the model's forward."""
    best = loading["fastest_at_batch_size"]
    load = best["images_per_s"]
    setting = f"--workers {best['workers']}" + (", pinned" if best["pin_memory"] else "")
    if load < forward_samples_per_s:
        return (f"loading is the bottleneck at batch size {batch}: {load:.1f} images/s at best ({setting}) "
                f"against the forward's {forward_samples_per_s:.1f} samples/s")
    return (f"the forward is the bottleneck at batch size {batch}: {forward_samples_per_s:.1f} samples/s against "
            f"loading's {load:.1f} images/s ({setting})")
