"""One video's metadata: size, frame rates, frame count, duration, codec, rotation.

OpenCV gives the size, the rate, the FourCC and the rotation; an MP4/MOV's own sample
table gives its frame count, duration and whether the rate varies; with ``exact`` every
frame is decoded and the count, duration and rates come from the frames' timestamps.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from torchtool.core.video.capture import Scan, cv2, opened, scan
from torchtool.core.video.container import VFR_SPREAD, mp4_tracks, sniff

# FourCC (as OpenCV reports it, from the codec or the container's tag) -> FFmpeg's codec name
CODECS = {
    "h264": ("h264", "avc1", "avc3", "H264", "X264", "x264", "AVC1"),
    "hevc": ("hevc", "hvc1", "hev1", "HEVC", "H265", "h265"),
    "vp8": ("VP80", "vp08"), "vp9": ("VP90", "vp09"), "av1": ("AV01", "av01"),
    "mpeg4": ("FMP4", "mp4v", "MP4V", "XVID", "xvid", "DIVX", "DX50", "divx"),
    "mjpeg": ("MJPG", "mjpg", "mjpa", "jpeg", "AVDJ"),
    "mpeg1video": ("mpg1", "MPG1"), "mpeg2video": ("mpg2", "MPG2", "mp2v", "hdv1"),
    "prores": ("apch", "apcn", "apcs", "apco", "ap4h"), "theora": ("theo",), "ffv1": ("FFV1",),
}
CODEC_OF = {tag: name for name, tags in CODECS.items() for tag in tags}


def _fourcc(value: float) -> str | None:
    code = int(value)
    text = "".join(chr((code >> 8 * i) & 0xFF) for i in range(4))
    return text.strip("\x00 ") if code and text.isprintable() else None


def check_file(path: Path) -> str:
    """The container :func:`sniff` names, or a ValueError saying why the file is no video to read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            kind = sniff(fh.read(192))
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    if kind and kind.isupper():
        raise ValueError(f"not a video (a {kind} image)")
    return kind or ""


def _row(path: Path, exact: bool) -> dict[str, Any]:
    row = dict.fromkeys(("width", "height", "fps", "avg_fps", "vfr", "frame_count", "duration", "codec", "fourcc",
                         "rotation"))
    return {"path": str(path)} | row | ({"exact_frame_count": None, "count_mismatch": None} if exact else {})


def probe(path: Path, exact: bool = False) -> dict[str, Any]:
    """One row of metadata (``error`` set, the rest None, when the file is not a readable video).

    ``fps`` is the nominal rate (the one most frames are at), ``avg_fps`` frames / duration,
    ``vfr`` whether they differ (None when unknown: a container without a frame table, no
    ``exact``); ``rotation`` the clockwise angle a player turns the frames (width and
    height are as stored); ``seekable`` (not shown) whether seeking by frame can be trusted.
    """
    row = _row(path, exact)
    try:
        kind = check_file(path)
        tracks = mp4_tracks(path) if kind == "mp4" else None
        if tracks and not any(handler == b"vide" for handler, _ in tracks):
            raise ValueError("no video stream")
        with opened(path) as cap:
            _read(cap, row, exact)
    except ValueError as why:
        return row | {"error": str(why)}
    timing = next((t for handler, t in tracks or [] if handler == b"vide"), None)
    if timing and not exact:  # the container's timestamps, not frames / fps
        row |= {"fps": round(timing.nominal_fps, 6), "avg_fps": round(timing.avg_fps, 6), "vfr": timing.vfr,
                "duration": round(timing.duration, 6)}
    elif kind == "avi" and row["vfr"] is None:
        row["vfr"] = False  # AVI has no timestamps: one frame every 1 / fps
    vfr = row["vfr"]
    return row | {"seekable": kind in ("mp4", "avi", "matroska") and vfr is not True, "error": None}


def _read(cap: Any, row: dict[str, Any], exact: bool) -> None:
    cv = cv2()
    width, height = int(cap.get(cv.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv.CAP_PROP_FRAME_HEIGHT))
    fps = float(cap.get(cv.CAP_PROP_FPS))
    frames = max(0, int(cap.get(cv.CAP_PROP_FRAME_COUNT)))
    # OpenCV's orientation is already the clockwise angle (minus the display matrix's counter-clockwise one);
    # rotating the frames it returns, it reports their displayed size: the row keeps the coded size (as ffprobe)
    rotation = int(cap.get(cv.CAP_PROP_ORIENTATION_META)) % 360 if hasattr(cv, "CAP_PROP_ORIENTATION_META") else 0
    if rotation in (90, 270) and cap.get(cv.CAP_PROP_ORIENTATION_AUTO):
        width, height = height, width
    if width <= 0 or height <= 0:
        raise ValueError("no video stream")
    fourcc = _fourcc(cap.get(cv.CAP_PROP_FOURCC))
    fps = fps if 0 < fps < 1e6 else None
    row |= {"width": width, "height": height, "fps": fps and round(fps, 6), "avg_fps": fps and round(fps, 6),
            "frame_count": frames, "duration": round(frames / fps, 6) if fps else None,
            "codec": CODEC_OF.get(fourcc or "", fourcc and fourcc.lower()), "fourcc": fourcc, "rotation": rotation or None}
    if exact:
        _exact(scan(cap), row, frames)


def _exact(counted: Scan, row: dict[str, Any], frames: int) -> None:
    """The decoded frames' count, and where they have timestamps, the duration and rates they give."""
    row |= {"exact_frame_count": counted.frames, "count_mismatch": counted.frames != frames}
    if counted.duration:
        vfr = counted.max_interval - counted.min_interval > VFR_SPREAD * counted.common_interval
        row |= {"duration": round(counted.duration, 6), "avg_fps": round(counted.frames / counted.duration, 6),
                "vfr": vfr}
        if vfr and counted.common_interval > 0:  # else OpenCV's rate: timestamps rounded to ms blur it
            row["fps"] = round(1000 / counted.common_interval, 6)
    elif row["fps"]:
        row["duration"] = round(counted.frames / row["fps"], 6)
