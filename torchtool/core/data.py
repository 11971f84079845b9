"""Finding images, loading them robustly, transforms, datasets and loaders.

A bad input (missing, zero-byte, truncated, not an image, a decompression bomb) never
raises out of a dataset: the sample carries an error string instead, so loops can skip
it, record why, and keep going.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torchtool.core.output import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Refuse images with more pixels than this (PIL's own bomb limit), decoded or not.
MAX_PIXELS = 89_478_485


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (any case)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def walk_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, in a deterministic sorted order."""
    found = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink back into the tree (a cycle): walked already
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_name(f))
    return found


def _read_list(lines: Iterable[str]) -> list[Path]:
    return [Path(line.rstrip("\r\n")) for line in lines if line.strip()]


def find_images(paths: Sequence[str], list_file: str | os.PathLike | None = None) -> list[Path]:
    """Resolve command-line inputs to an ordered list of image paths.

    ``paths`` may hold image files, directories (walked recursively, sorted) and ``-``
    (paths read from stdin, one per line); ``list_file`` holds one path per line. Paths
    named on the command line must exist; paths from lists are kept even when missing,
    so they show up as skipped rows rather than silently vanishing.
    """
    images: list[Path] = []
    if list_file is not None:
        list_path = Path(list_file)
        if not list_path.is_file():
            raise UsageError(f"no such list file: {list_path}")
        with open(list_path, encoding="utf-8") as fh:
            images.extend(_read_list(fh))
    for raw in paths:
        if raw == "-":
            images.extend(_read_list(sys.stdin))
            continue
        path = Path(raw)
        if path.is_dir():
            images.extend(walk_images(path))
        elif path.exists():
            images.append(path)
        else:
            raise UsageError(f"no such file or directory: {raw}")
    if not images:
        raise UsageError("no images found in the inputs",
                         hint=f"looked for {', '.join(IMAGE_EXTENSIONS)} files (case-insensitive)")
    return images


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        # 16-bit (and float) images: scale to 8 bits instead of clipping everything to white.
        top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Any:
    """Open an image as RGB with EXIF orientation applied; raise ValueError/OSError if bad."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        # Our own limit below reports bombs as one line; PIL's extra warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(f"decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels}")
        img.load()  # decode now so truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def describe_error(exc: BaseException) -> str:
    """A short, single-line reason for a bad input."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (or an unsupported format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}".splitlines()[0][:200]
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


class CenterCrop:
    """Resize the shorter side to ``resize_size``, center-crop ``crop_size``: a uint8 HxWx3 tensor.

    Pixel for pixel what torchvision's ``Resize(resize_size)`` + ``CenterCrop(crop_size)`` give
    on a PIL image (the same PIL resample), without torchvision's per-call dispatch; the uint8
    result is 4x smaller to pass between processes than a float tensor. Normalise batches
    with :class:`Normalize`.
    """

    def __init__(self, crop_size: int, resize_size: int, interpolation: str = "bilinear"):
        self.crop_size, self.resize_size, self.interpolation = crop_size, resize_size, interpolation

    def __call__(self, img: Any) -> Any:
        import numpy as np
        import torch
        from torchvision.transforms import InterpolationMode, v2
        from torchvision.transforms.functional import pil_modes_mapping

        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.resize_size * long / short)  # torchvision's rounding
        new_w, new_h = (self.resize_size, new_long) if w <= h else (new_long, self.resize_size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), pil_modes_mapping[InterpolationMode(self.interpolation)])
        crop = self.crop_size
        if crop > min(new_w, new_h):  # torchvision pads with zeros
            return torch.from_numpy(np.array(v2.functional.center_crop(img, [crop]), dtype=np.uint8))
        top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
        return torch.from_numpy(np.asarray(img)[top:top + crop, left:left + crop].copy())


class Normalize:
    """uint8 ``N x H x W x 3`` batches -> normalised float ``N x 3 x H x W`` on ``device``.

    ``(x / 255 - mean) / std`` as one fused multiply-add (equal to torchvision's ToDtype +
    Normalize up to float rounding); the result is channels_last in memory, what
    convolutions want on CPU and GPU alike.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: Any = "cpu"):
        import torch

        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(device)

    def __call__(self, x: Any) -> Any:
        import torch

        x = x.to(self.scale.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return torch.addcmul(self.shift, x, self.scale)


def eval_transform(crop_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bilinear") -> Any:
    """Resize, center crop, to float tensor, normalise: the weights' own evaluation preset, per image."""
    return EvalTransform(CenterCrop(crop_size, resize_size, interpolation), mean, std)


class EvalTransform:
    """PIL image -> normalised float ``3 x H x W`` tensor, exactly as torchvision's preset computes it."""

    def __init__(self, crop: CenterCrop, mean: Sequence[float], std: Sequence[float]):
        import torch
        from torchvision.transforms import v2

        self.crop = crop
        self.to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, img: Any) -> Any:
        return self.to_float(self.crop(img).permute(2, 0, 1).contiguous())


def preprocess_transform(preprocess: Any) -> Any:
    """:func:`eval_transform` for a :class:`torchtool.core.models.Preprocess`."""
    p = preprocess
    return eval_transform(p.crop_size, p.resize_size, p.mean, p.std, p.interpolation)


class ImageDataset:
    """Images by path (and optional targets) that never raise on a bad file.

    Each item is ``(tensor, target, index, error)``: ``error`` is "" for a good image;
    for a bad one the tensor is zeros of ``fallback_shape`` (and ``fallback_dtype``, the
    transform's output dtype) and ``error`` says why.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Any, targets: Sequence[int] | None = None,
                 fallback_shape: tuple[int, ...] = (3, 224, 224), max_pixels: int = MAX_PIXELS,
                 fallback_dtype: str = "float32"):
        self.paths = [str(p) for p in paths]
        self.targets = list(targets) if targets is not None else None
        self.transform = transform
        self.fallback_shape = fallback_shape
        self.fallback_dtype = fallback_dtype
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int, str]:
        import torch

        target = self.targets[index] if self.targets is not None else -1
        try:
            img = load_image(self.paths[index], self.max_pixels)
            return self.transform(img), target, index, ""
        except Exception as exc:  # any decoder failure is a bad input, not a crash
            return (torch.zeros(self.fallback_shape, dtype=getattr(torch, self.fallback_dtype)), target, index,
                    describe_error(exc))


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder tree ``root/<class>/...``: (paths, targets, sorted class names).

    Class folders with no image files are kept in ``classes`` so callers can report them.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"no such directory: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[Path] = []
    targets: list[int] = []
    for idx, name in enumerate(classes):
        files = walk_images(root / name)
        paths.extend(files)
        targets.extend([idx] * len(files))
    return paths, targets, classes


def lower_priority(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: decode at a lower CPU priority than the model's threads.

    On a machine with few cores the workers would otherwise preempt the forward pass's
    OpenMP threads mid-operation; niced, they fill the gaps instead.
    """
    try:
        os.nice(10)
    except OSError:
        pass


def make_loader(dataset: Any, batch_size: int, workers: int, *, shuffle: bool = False, sampler: Any = None,
                pin_memory: bool = False, drop_last: bool = False, seed: int | None = None,
                worker_init: Any = None) -> Any:
    """A DataLoader with the settings every command wants (persistent workers, prefetch)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=workers, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      generator=generator, worker_init_fn=worker_init)
