"""Finding image files and decoding them robustly to RGB.

A bad input (missing, zero-byte, truncated, not an image, a decompression bomb) raises
here with a reason :func:`describe_error` turns into one short line.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtool.core.files import find_inputs, walk_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Refuse images with more pixels than this (PIL's own bomb limit), decoded or not.
MAX_PIXELS = 89_478_485


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (any case)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def walk_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, in a deterministic sorted order."""
    return walk_files(root, is_image_name)


def find_images(paths: Sequence[str], list_file: str | os.PathLike | None = None) -> list[Path]:
    """Resolve command-line inputs to an ordered list of image paths.

    ``paths`` may hold image files, directories (walked recursively, sorted) and ``-``
    (paths read from stdin, one per line); ``list_file`` holds one path per line. Paths
    named on the command line must exist; paths from lists are kept even when missing,
    so they show up as skipped rows rather than silently vanishing.
    """
    return [path for path, _ in find_inputs(paths, list_file, is_image_name, "images", IMAGE_EXTENSIONS)]


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


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _open_regular(path: str | os.PathLike) -> Any:
    """A binary file object for ``path``, refusing anything but a regular file (a FIFO would block forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: opening a FIFO returns at once
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ValueError(f"not a regular file: {kind}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@dataclass(frozen=True)
class DecodeFloor:
    """How small a reduced JPEG decode (``--fast-decode``) may be: short side >= ``side`` pixels and
    area >= ``area`` pixels (what a random crop of the smallest scale needs; 0: no area bound)."""

    side: int
    area: int = 0

    def scale(self, width: int, height: int) -> int:
        """The largest DCT scale denominator (8, 4, 2, else 1) whose decode still meets both bounds.

        libjpeg's decode at 1/x is ceil(W/x) x ceil(H/x); the floors used here are never larger.
        """
        for x in (8, 4, 2):
            w, h = width // x, height // x
            if min(w, h) >= self.side and w * h >= self.area:
                return x
        return 1


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, decode: DecodeFloor | None = None) -> Any:
    """Open an image as RGB with EXIF orientation applied; raise ValueError/OSError if bad.

    Only regular files are read: a FIFO, socket or device named like an image is refused.
    With ``decode`` (``--fast-decode``) a JPEG is decoded at the largest DCT scale (1/2, 1/4,
    1/8: ``PIL.Image.draft``, what ``thumbnail()`` does) that still meets the
    :class:`DecodeFloor`: a 12-megapixel photo costs a quarter of the time, and the resize
    that follows starts from a smaller picture. Other formats decode in full.
    """
    from PIL import Image, ImageOps

    with _open_regular(path) as fh:
        with warnings.catch_warnings():
            # Our own limit below reports bombs as one line; PIL's extra warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh)
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels} (--max-pixels)")
            scale = decode.scale(width, height) if decode is not None and img.format == "JPEG" else 1
            if scale > 1:  # asking for exactly 1/scale of each side makes draft() pick that scale
                img.draft(None, (width // scale, height // scale))
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
