"""Real videos written with OpenCV for the video tests: frame i is a flat grey of level LEVEL(i)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STEP = 9  # grey levels between consecutive frames: a frame off by one is plain to see


def level(i: int) -> int:
    return 20 + (i * STEP) % 220


def write_video(path: Path, frames: int, fourcc: str = "mp4v", size: tuple[int, int] = (64, 48),
                fps: float = 25.0) -> Path:
    """``frames`` frames of ``size`` (width, height) at ``fps``; MJPG for .avi, mp4v for .mp4 by default."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), level(i), np.uint8))
    writer.release()
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut the file at ``fraction`` of its bytes (a copy cut short mid-stream)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
