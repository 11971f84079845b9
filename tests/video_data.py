"""Real videos for the video tests: frame i is a flat grey of level LEVEL(i) with its index drawn in its
bottom 16 rows as 16 black/white blocks (:func:`read_index` reads it back, whatever the codec did).

Videos are written with OpenCV; :func:`ffmpeg` converts them (H.264 in MPEG-TS, variable frame
rates, rotation tags) where FFmpeg is installed, and skips the test where it is not.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

STEP = 9  # grey levels between consecutive frames: a frame off by one is plain to see
BITS = 16


def level(i: int) -> int:
    return 20 + (i * STEP) % 220


def frame(i: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    width, height = size
    image = np.full((height, width, 3), level(i), np.uint8)
    block = width // 8
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        image[height - 16 + 8 * row:height - 8 + 8 * row, col * block:(col + 1) * block] = 255 if i >> bit & 1 else 0
    return image


def read_index(image: np.ndarray) -> int:
    """The index :func:`frame` drew into ``image`` (the middle of each block, so compression cannot flip it)."""
    height, width = image.shape[:2]
    block, n = width // 8, 0
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        middle = image[height - 14 + 8 * row:height - 10 + 8 * row, col * block + block // 4:(col + 1) * block - block // 4]
        n |= int(middle.mean() > 127) << bit
    return n


def write_video(path: Path, frames: int, fourcc: str = "mp4v", size: tuple[int, int] = (64, 48),
                fps: float = 25.0) -> Path:
    """``frames`` frames of ``size`` (width, height) at ``fps``; MJPG for .avi, mp4v for .mp4 by default."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(frames):
        writer.write(frame(i, size))
    writer.release()
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut the file at ``fraction`` of its bytes (a copy cut short mid-stream)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def ffmpeg(*args: str | Path) -> None:
    """Run ffmpeg quietly (the test is skipped where FFmpeg is not installed: apt install ffmpeg)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg (apt install ffmpeg)")
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args)], check=True, capture_output=True)


def ffprobe(path: Path, entries: str, *extra: str) -> str:
    """One value of ``ffprobe -show_entries ENTRIES`` for the first video stream."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", *extra, "-show_entries", entries,
                          "-of", "default=nw=1:nk=1", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.split()[0] if out.stdout.split() else ""


# --- natural-looking footage: a slow pan and zoom over one of scikit-learn's photographs ----------


def _photo_bgr(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return np.ascontiguousarray(load_sample_image(name)[:, :, ::-1])  # RGB -> BGR, as VideoWriter takes it


_PHOTOS: dict[str, np.ndarray] = {}


def scene(i: int, size: tuple[int, int] = (64, 48), photo: str = "china.jpg", stamp: bool = True) -> np.ndarray:
    """Frame ``i`` (BGR) of a pan and zoom over ``photo`` (china.jpg or flower.jpg), so codecs see real texture
    and motion and neighbouring frames give different features; ``stamp`` draws :func:`frame`'s index blocks
    into the bottom 16 rows (:func:`read_index` reads them back)."""
    import math

    import cv2

    src = _PHOTOS.setdefault(photo, _photo_bgr(photo))
    (big_h, big_w), (width, height) = src.shape[:2], size
    zoom = 0.55 + 0.35 * (1 + math.cos(i / 40)) / 2  # the share of the photo's height in view
    w = min(big_w, int(big_h * zoom * width / height))
    h = int(w * height / width)
    x = int((big_w - w) * (1 + math.sin(i / 25)) / 2)
    y = int((big_h - h) * (1 + math.sin(i / 33 + 1)) / 2)
    image = cv2.resize(src[y:y + h, x:x + w], size, interpolation=cv2.INTER_AREA)
    if stamp:
        image[-16:] = frame(i, size)[-16:]
    return image


def write_scene_video(path: Path, frames: int, fourcc: str = "mp4v", size: tuple[int, int] = (64, 48),
                      fps: float = 25.0, photo: str = "china.jpg", stamp: bool = True) -> Path:
    """``frames`` frames of :func:`scene` written with OpenCV's ``fourcc`` (mp4v .mp4, MJPG/XVID .avi,
    XVID .mkv, VP80 .webm are the ones this OpenCV writes)."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {path} with {fourcc}"
    for i in range(frames):
        writer.write(scene(i, size, photo, stamp))
    writer.release()
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame OpenCV decodes reading ``path`` front to back (RGB): the reference for seeks."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(image[:, :, ::-1]))
    cap.release()
    return frames
