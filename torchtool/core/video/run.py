"""A video-info run: each video's row (metadata, TSN indices, frames written), read by threads."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torchtool.core.video.frames import check_folders, extract_frames, frame_folders
from torchtool.core.video.inputs import VideoInput
from torchtool.core.video.metadata import probe
from torchtool.core.video.tsn import tsn_indices, video_rng


@dataclass
class VideoConfig:
    """What ``torchtool video-info`` was asked for."""

    exact: bool = False
    segments: int | None = None
    mode: str = "test"
    seed: int = 0
    quality: int = 95
    overwrite: bool = False


def plan_frames(videos: Sequence[VideoInput], out: Path) -> list[VideoInput]:
    """The videos with their frame folders under ``out``: collisions refused, every folder checked writable,
    before any video is decoded."""
    folders = frame_folders([(v.path, v.root) for v in videos], out)
    check_folders(folders)
    return [replace(v, frames=f) for v, f in zip(videos, folders)]


def describe(video: VideoInput, cfg: VideoConfig) -> dict[str, Any]:
    """One video's row: metadata, and with ``segments`` its TSN ``indices`` (and frames written)."""
    row = probe(video.path, cfg.exact)
    seekable = row.pop("seekable", False)
    if cfg.segments is not None and not row["error"]:
        n = row["exact_frame_count"] if cfg.exact else row["frame_count"]
        try:
            row["indices"] = tsn_indices(n, cfg.segments, cfg.mode, video_rng(cfg.seed, video.path))
            if video.frames is not None:
                row["frames_dir"] = str(video.frames)
                row["frames_written"] = extract_frames(video.path, video.frames, row["indices"], row["fps"],
                                                       seekable, cfg.quality, cfg.overwrite)
        except ValueError as why:
            row["error"] = str(why)
    row["error"] = row.pop("error")  # the last column
    return row


def describe_all(videos: Sequence[VideoInput], cfg: VideoConfig, workers: int) -> Iterable[dict[str, Any]]:
    """Rows in input order, read by ``workers`` threads (OpenCV decodes without holding the GIL)."""
    if workers <= 1 or len(videos) == 1:
        yield from (describe(v, cfg) for v in videos)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(lambda v: describe(v, cfg), videos)
    finally:  # a --strict failure or Ctrl-C: the videos not started yet are not read
        pool.shutdown(wait=True, cancel_futures=True)
