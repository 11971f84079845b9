"""What a file is, from its first bytes, and an MP4/MOV's own frame timing (plain Python, no OpenCV).

:func:`sniff` names the container (or the image format of a picture with a video's name);
:func:`mp4_timing` reads the video track's sample table (``stts``): the frame count, the
duration from the container's timestamps, and whether the frame rate varies. Other
containers store no such table up front; their timing comes from OpenCV or a full decode.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

IMAGES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"}
MAX_MOOV = 256 << 20  # a moov past this is not read (a 10-hour video's tables are a few MB)
VFR_SPREAD = 0.1  # frame intervals that differ by more than this fraction: a variable frame rate


def sniff(head: bytes) -> str | None:
    """The container of a file starting with ``head`` (mp4, avi, matroska, mpegts, mpegps), an image
    format in capitals (JPEG, PNG, ...), or None when not recognised."""
    for magic, name in IMAGES.items():
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[4:8] in MP4_BOXES:
        return "mp4"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "matroska"
    if head[:1] == b"G" and head[188:189] in (b"G", b""):
        return "mpegts"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpegps"
    return None


@dataclass(frozen=True)
class Timing:
    """A video track's timing from its container's timestamps."""

    frames: int
    duration: float  # seconds, the sum of the frames' durations
    nominal_fps: float  # the rate most frames are at
    vfr: bool

    @property
    def avg_fps(self) -> float:
        return self.frames / self.duration


def _boxes(buf: bytes, start: int, end: int):
    """(type, payload start, payload end) of the boxes in ``buf[start:end]``."""
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, start)
        header = 8
        if size == 1 and start + 16 <= end:
            size, header = struct.unpack_from(">Q", buf, start + 8)[0], 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            return
        yield kind, start + header, start + size
        start += size


def _child(buf: bytes, start: int, end: int, *path: bytes) -> tuple[int, int] | None:
    for kind, a, b in _boxes(buf, start, end):
        if kind == path[0]:
            return (a, b) if len(path) == 1 else _child(buf, a, b, *path[1:])
    return None


def _read_moov(path: Path) -> bytes | None:
    with open(path, "rb") as fh:
        size, pos = os.fstat(fh.fileno()).st_size, 0
        while pos + 8 <= size:
            fh.seek(pos)
            head = fh.read(16)
            box, kind = struct.unpack_from(">I4s", head)
            header = 8
            if box == 1 and len(head) == 16:
                box, header = struct.unpack_from(">Q", head, 8)[0], 16
            elif box == 0:
                box = size - pos
            if box < header:
                return None
            if kind == b"moov":
                if box > MAX_MOOV:
                    return None
                fh.seek(pos + header)
                return fh.read(box - header)
            pos += box
    return None


def mp4_tracks(path: Path) -> list[tuple[bytes, Timing | None]] | None:
    """(handler type, e.g. b"vide"/b"soun", its timing) of each track; None without a readable moov."""
    moov = _read_moov(path)
    if moov is None:
        return None
    tracks = []
    for kind, a, b in _boxes(moov, 0, len(moov)):
        if kind != b"trak" or (mdia := _child(moov, a, b, b"mdia")) is None:
            continue
        hdlr, mdhd = _child(moov, *mdia, b"hdlr"), _child(moov, *mdia, b"mdhd")
        stts = _child(moov, *mdia, b"minf", b"stbl", b"stts")
        handler = moov[hdlr[0] + 8:hdlr[0] + 12] if hdlr else b""
        tracks.append((handler, _timing(moov, mdhd, stts)))
    return tracks


def _timing(moov: bytes, mdhd: tuple[int, int] | None, stts: tuple[int, int] | None) -> Timing | None:
    if mdhd is None or stts is None:
        return None
    version = moov[mdhd[0]]
    timescale = struct.unpack_from(">I", moov, mdhd[0] + (20 if version == 1 else 12))[0]
    (count,) = struct.unpack_from(">I", moov, stts[0] + 4)
    entries = [struct.unpack_from(">II", moov, stts[0] + 8 + 8 * i) for i in range(min(count, (stts[1] - stts[0] - 8) // 8))]
    frames = sum(n for n, _ in entries)
    ticks = sum(n * d for n, d in entries)
    if not timescale or not frames or not ticks:
        return None  # a fragmented MP4: the timing lives in the fragments
    # the last frame's duration is often a guess of the muxer's: it says nothing about the rate
    body = entries[:-1] if len(entries) > 1 and entries[-1][0] == 1 else entries
    deltas = [d for n, d in body if d]
    common = max(body, key=lambda e: e[0])[1] or ticks / frames
    vfr = bool(deltas) and max(deltas) - min(deltas) > VFR_SPREAD * min(deltas)
    return Timing(frames, ticks / timescale, timescale / common, vfr)
