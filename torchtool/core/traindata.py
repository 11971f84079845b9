"""finetune's data: train/val image folders or a stratified split, checked before training.

Training samples are augmented with torch's generator seeded from (run seed, epoch, image
index), so a run's augmentations do not depend on the number of workers or processes, and
a resumed run sees exactly the images an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtool.core.data import scan_image_folder
from torchtool.core.output import UsageError

LAYOUT_HINT = "expected DATA/train/<class>/... and DATA/val/<class>/..., or DATA/<class>/... with --val-split 0.2"


@dataclass
class Splits:
    """Image paths and targets of both splits, and where they came from."""

    classes: list[str]
    train_paths: list[Path]
    train_targets: list[int]
    val_paths: list[Path]
    val_targets: list[int]
    val_dir: Path  # absolute; with --val-split this is DATA itself and val_files lists the held-out images
    val_files: list[str] | None = None


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): ``fraction`` of each class held out, chosen by ``seed``.

    Every class with two or more images keeps at least one on each side.
    """
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    rng = random.Random(seed)
    train, val = [], []
    for t in sorted(by_class):
        idx = by_class[t]
        rng.shuffle(idx)
        k = min(max(round(len(idx) * fraction), 1), len(idx) - 1) if len(idx) > 1 else 0
        val.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(val)


def _scan(root: Path, what: str) -> tuple[list[Path], list[int], list[str]]:
    paths, targets, classes = scan_image_folder(root)
    if not classes:
        raise UsageError(f"no class folders in {root}", hint=LAYOUT_HINT)
    if not paths:
        raise UsageError(f"no images in the {what} class folders under {root}",
                         hint="looked for .jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff and .gif files")
    return paths, targets, classes


def find_splits(data: str | Path, val_split: float | None, seed: int) -> Splits:
    """Read DATA (train/ and val/, or class folders split by ``val_split``) and check it."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"no such directory: {data}", hint=LAYOUT_HINT)
    if val_split is not None and not 0 < val_split < 1:
        raise UsageError(f"--val-split must be between 0 and 1, got {val_split}")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = root / "val"
    paths, targets, classes = _scan(train_root, "training")
    counts = [0] * len(classes)
    for t in targets:
        counts[t] += 1
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise UsageError(f"{len(empty)} class folder(s) without images in {train_root}: {', '.join(empty[:10])}",
                         hint="remove the empty folders or add images to them")
    if len(classes) < 2:
        raise UsageError(f"only one class ({classes[0]}) in {train_root}", hint="a classifier needs two or more")

    if val_root.is_dir() and train_root != root:
        if val_split is not None:
            raise UsageError(f"--val-split conflicts with {val_root}", hint="use the val/ folder or --val-split, not both")
        vpaths, vtargets_local, vclasses = _scan(val_root, "validation")
        unknown = [c for c in vclasses if c not in classes]
        if unknown:
            raise UsageError(f"validation class(es) unknown to training: {', '.join(unknown[:10])}",
                             hint=f"every folder in {val_root} needs a folder of the same name in {train_root}")
        remap = [classes.index(c) for c in vclasses]
        return Splits(classes, paths, targets, vpaths, [remap[t] for t in vtargets_local], val_root)
    if val_split is None:
        where = "DATA/val" if train_root != root else "DATA/train and DATA/val"
        raise UsageError(f"no validation images: {root} has no {where}", hint="pass --val-split 0.2 to hold out 20%")
    tr, va = stratified_split(targets, val_split, seed)
    if not va:
        raise UsageError(f"--val-split {val_split} leaves no validation images", hint="use more images per class")
    return Splits(classes, [paths[i] for i in tr], [targets[i] for i in tr], [paths[i] for i in va],
                  [targets[i] for i in va], train_root, [str(paths[i].relative_to(train_root)) for i in va])


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
