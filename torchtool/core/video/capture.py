"""Reading a video through OpenCV (FFmpeg) without trusting it blindly.

- :func:`opened`: a ``cv2.VideoCapture`` of a path OpenCV can take: never a name with
  surrogates (a file name that is not UTF-8 crashes OpenCV), never a relative name FFmpeg
  could read as a protocol (``concat:``); such a file is opened through ``/proc/self/fd``.
- :func:`grab`: the next frame, past a read error: a damaged file's decoder still holds
  frames, and the next grab after the error drains them (as ``ffprobe -count_frames``).
- :func:`scan`: every frame's timestamp, for the exact count, duration and frame rate.
- :func:`frames_at`: the frames at some indices. A seek is checked against the timestamp of
  the frame it reached; where the container's seek cannot be trusted (MPEG-TS lands on a
  keyframe, a truncated file on its last frame), or the rate varies, the video is decoded
  forward, so frame N is always the N-th frame that decodes, or an error.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Seeking costs a keyframe's decode; grabbing forward is cheaper when the next frame is this close.
SEEK_DISTANCE = 16
# A read error costs one failed grab and the end of the file another; past two, nothing is left.
GRAB_TRIES = 3


def cv2() -> Any:
    """OpenCV, with its own and FFmpeg's log lines off (a bad file is a row's error, not stderr noise)."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    import cv2 as module

    return module


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Any]:
    """An opened ``cv2.VideoCapture`` of ``path`` (released afterwards), or a ValueError saying why not."""
    cv = cv2()
    name, fd = os.path.abspath(path), None
    if not _utf8(name):
        if not os.path.isdir("/proc/self/fd"):
            raise ValueError("file name is not valid UTF-8 (OpenCV cannot open it here): rename it")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ValueError(exc.strerror or str(exc)) from None
        name = f"/proc/self/fd/{fd}"  # the same file, under a name OpenCV can take
    try:
        cap = cv.VideoCapture(name, cv.CAP_FFMPEG)
        try:
            if not cap.isOpened():
                raise ValueError("not a readable video (FFmpeg cannot open it)")
            yield cap
        finally:
            cap.release()
    finally:
        if fd is not None:
            os.close(fd)


def grab(cap: Any) -> bool:
    """Grab the next frame (decode, no colour conversion), trying again after a read error."""
    return any(cap.grab() for _ in range(GRAB_TRIES))


@dataclass(frozen=True)
class Scan:
    """Every frame decoded: how many, and their presentation times (ms)."""

    frames: int
    first_ms: float = 0.0
    last_ms: float = 0.0
    min_interval: float = 0.0
    max_interval: float = 0.0
    common_interval: float = 0.0  # the median

    @property
    def duration(self) -> float | None:
        """Seconds from the first frame's start to the last one's end (None without timestamps)."""
        if self.frames < 2 or self.last_ms <= self.first_ms:
            return None
        return (self.last_ms - self.first_ms) * self.frames / (self.frames - 1) / 1000


def scan(cap: Any) -> Scan:
    """Decode every frame from the current position, noting each one's timestamp."""
    cv = cv2()
    times = []
    while grab(cap):
        times.append(cap.get(cv.CAP_PROP_POS_MSEC))
    if len(times) < 2:
        return Scan(len(times))
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return Scan(len(times), times[0], times[-1], gaps[0], gaps[-1], gaps[len(gaps) // 2])


class _Untrusted(Exception):
    """A seek reached another frame than the one asked for."""


def frames_at(path: Path, indices: Sequence[int], fps: float | None, seekable: bool) -> Iterator[tuple[int, Any]]:
    """(index, BGR frame) for each distinct index, in order; a ValueError for a frame that does not decode.

    With ``seekable`` far frames are reached by seeking, each checked against its timestamp
    (frame 0's plus index / fps, within a tenth of a frame); the first miss restarts the
    video decoding forward, so the frames already given are given again, right this time.
    """
    wanted = sorted(set(indices))
    if seekable and fps and fps > 0:
        try:
            with opened(path) as cap:
                yield from _seeking(cap, wanted, fps)
            return
        except _Untrusted:
            pass
    with opened(path) as cap:
        position = 0  # the index of the frame the next grab returns
        for index in wanted:
            while position <= index:
                if not grab(cap):
                    raise ValueError(f"frame {index} does not decode (the video ends after {position} frames)")
                position += 1
            yield index, _retrieve(cap, index)


def _seeking(cap: Any, wanted: list[int], fps: float) -> Iterator[tuple[int, Any]]:
    cv = cv2()
    interval = 1000 / fps
    tolerance = max(interval / 10, 1.0)  # 1 ms: containers that store milliseconds round to them
    if not grab(cap):
        raise _Untrusted
    start, position = cap.get(cv.CAP_PROP_POS_MSEC), 1
    for index in wanted:
        if index + 1 != position:  # frame 0 is already grabbed
            if index < position or index - position > SEEK_DISTANCE:
                cap.set(cv.CAP_PROP_POS_FRAMES, index)
                position = index
            while position <= index:
                if not grab(cap):
                    raise _Untrusted  # the end, or a seek past it: decoding forward tells which
                position += 1
        if not math.isclose(cap.get(cv.CAP_PROP_POS_MSEC), start + index * interval, abs_tol=tolerance):
            raise _Untrusted
        yield index, _retrieve(cap, index)


def _retrieve(cap: Any, index: int) -> Any:
    ok, frame = cap.retrieve()
    if not ok or frame is None:
        raise ValueError(f"frame {index} does not decode")
    return frame
