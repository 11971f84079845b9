"""Class folders (``root/<class>/...``) and their train/validation splits, checked before any work.

Class names come from torchvision's ``find_classes``; files are walked with our own
symlink-cycle guard (torchvision's ``make_dataset`` follows a cycle until the path is too
long) and a symbolic link into another class folder (or back to the root) is not followed.
``--val-split`` is scikit-learn's stratified ``train_test_split``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchtool.core.data.images import IMAGE_EXTENSIONS, is_image_name
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
    train_dir: Path  # absolute: DATA/train, or DATA itself
    val_files: list[str] | None = None

    def image_files(self) -> dict[str, list[str]]:
        """Both splits' images relative to their folders (recorded in checkpoints; DATA may move)."""
        return {"train": [os.fsdecode(p.relative_to(self.train_dir)) for p in self.train_paths],
                "val": [os.fsdecode(p.relative_to(self.val_dir)) for p in self.val_paths]}


def changed_files(before: dict[str, list[str]], now: dict[str, list[str]]) -> list[str]:
    """"train: 3 added, 1 removed"-style lines for each split whose image files differ."""
    lines = []
    for split in ("train", "val"):
        old, new = set(before.get(split, ())), set(now.get(split, ()))
        if old != new:
            lines.append(f"{split}: {len(new - old)} added, {len(old - new)} removed")
    return lines


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder tree ``root/<class>/...``: (paths, targets, sorted class names).

    Hidden folders (``.ipynb_checkpoints``...) are no classes. Class folders with no image
    files are kept in ``classes`` so callers can report them. Each class folder is walked as
    :func:`~torchtool.core.data.images.walk_images` walks (sorted, symbolic links followed, a
    cycle once), except that a link (to a folder or a file) that leads into another class
    folder, or to the root or above it, is not followed: no image is counted in two classes.
    """
    from torchvision.datasets.folder import find_classes

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"no such directory: {root}")
    try:
        classes = [c for c in find_classes(str(root))[0] if not c.startswith(".")]
    except FileNotFoundError:  # find_classes' word for "no class folders"
        classes = []
    real = [os.path.realpath(root / name) for name in classes]
    above: set[str] = set()  # the root, every class folder and every folder holding them
    for folder in [os.path.realpath(root), *real]:
        while folder not in above:
            above.add(folder)
            folder = os.path.dirname(folder)
    paths: list[Path] = []
    targets: list[int] = []
    for idx, name in enumerate(classes):
        files = _class_files(root / name, real[idx], set(real), above)
        paths.extend(files)
        targets.extend([idx] * len(files))
    return paths, targets, classes


def _class_files(top: Path, own: str, fences: set[str], above: set[str]) -> list[Path]:
    """The image files of one class folder ``top`` (real path ``own``), in walk_images' order, without
    following a link into another of ``fences`` or onto a folder in ``above`` (the root, its ancestors)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    real_dirs: dict[str, str] = {}

    def foreign(link: str, is_dir: bool) -> bool:
        if is_dir:  # few: resolved fully
            target = os.path.realpath(link)
        else:  # many, in datasets made of links: one readlink, the folder resolved once
            folder, name = os.path.split(os.path.join(os.path.dirname(link), os.readlink(link)))
            if folder not in real_dirs:
                real_dirs[folder] = os.path.realpath(folder)
            target = os.path.join(real_dirs[folder], name)
            if os.path.islink(target):  # a chain of links
                target = os.path.realpath(target)
        if target in above and target != own:
            return True
        while True:  # the nearest class folder holding the target decides
            if target in fences:
                return target != own
            parent = os.path.dirname(target)
            if parent == target:
                return False
            target = parent

    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:  # unreadable: skipped, as os.walk does
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        files, dirs = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if entry.is_symlink() and (is_dir or is_image_name(entry.name)):
                try:
                    if foreign(entry.path, is_dir):
                        continue
                except OSError:  # a link that cannot be read: kept, and reported as unreadable if an image
                    pass
            (dirs if is_dir else files).append(entry.name)
        found.extend(folder / f for f in sorted(files) if is_image_name(f))
        stack.extend(folder / d for d in sorted(dirs, reverse=True))
    return found


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): ``fraction`` held out, stratified by class, chosen by ``seed``.

    scikit-learn's ``train_test_split(stratify=...)``; a class with a single image stays in
    training (stratifying needs two).
    """
    from sklearn.model_selection import train_test_split

    counts = Counter(targets)
    lone = [i for i, t in enumerate(targets) if counts[t] < 2]
    rest = [i for i, t in enumerate(targets) if counts[t] >= 2]
    if not rest:
        return sorted(lone), []
    try:
        train, val = train_test_split(rest, test_size=fraction, random_state=seed,
                                      stratify=[targets[i] for i in rest])
    except ValueError as exc:  # fewer held-out (or kept) images than classes
        raise UsageError(f"--val-split {fraction} cannot hold out every class of {len(rest)} images: {exc}",
                         hint="use a --val-split that leaves at least one image of each class on each side") from None
    return sorted([*train, *lone]), sorted(val)


def _scan(root: Path, what: str) -> tuple[list[Path], list[int], list[str]]:
    paths, targets, classes = scan_image_folder(root)
    if not classes:
        raise UsageError(f"no class folders in {root}", hint=LAYOUT_HINT)
    if not paths:
        raise UsageError(f"no images in the {what} class folders under {root}",
                         hint=f"looked for {', '.join(IMAGE_EXTENSIONS)} files (case-insensitive)")
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
    counts = Counter(targets)
    empty = [c for i, c in enumerate(classes) if not counts[i]]
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
        return Splits(classes, paths, targets, vpaths, [remap[t] for t in vtargets_local], val_root, train_root)
    if val_split is None:
        where = "DATA/val" if train_root != root else "DATA/train and DATA/val"
        raise UsageError(f"no validation images: {root} has no {where}", hint="pass --val-split 0.2 to hold out 20%")
    tr, va = stratified_split(targets, val_split, seed)
    if not va:
        raise UsageError(f"--val-split {val_split} leaves no validation images", hint="use more images per class")
    return Splits(classes, [paths[i] for i in tr], [targets[i] for i in tr], [paths[i] for i in va],
                  [targets[i] for i in va], train_root, train_root, [str(paths[i].relative_to(train_root)) for i in va])
