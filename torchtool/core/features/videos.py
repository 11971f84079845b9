"""Videos as extract-features inputs: which frames, where their rows go, the frames in loader workers.

- :class:`Sampling`: ``--segments K`` (TSN, video-info's indices), ``--fps F`` or ``--every N``,
  ``--max-frames``, ``--pool-frames``.
- :func:`plan_videos`: each video's frame count, rate and sampled indices, before any frame is decoded.
- :class:`Layout`: the rows of the arrays: [videos, K, ...] for segments, [frames, ...] with
  ``offsets`` for a varying count, [videos, ...] when pooled.
- :class:`VideoFrames`: what a loader worker does: open a video, seek/grab only its sampled
  frames, crop them to uint8 like an image; every planned row comes out once, good or with an error.
- :class:`FramePool`: a video's frames -> its one row, once they are all in (so the result does
  not depend on which process or batch brought them).
- :func:`video_index`: index.csv, one row per video.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from torchtool.core.features.store import OK, PENDING, SKIPPED
from torchtool.core.output import UsageError
from torchtool.core.video.capture import cv2, frames_at
from torchtool.core.video.metadata import probe
from torchtool.core.video.tsn import MAX_SEGMENTS, every_indices, rate_indices, tsn_indices, video_rng

DEFAULT_SEGMENTS = 8
FRAME_POOLS = ("none", "mean", "max")


@dataclass(frozen=True)
class Sampling:
    """Which frames of each video are extracted, and whether they are pooled into one row."""

    method: str = "segments"  # segments | fps | every
    segments: int | None = DEFAULT_SEGMENTS
    mode: str = "test"
    seed: int = 0
    fps: float | None = None
    every: int | None = None
    max_frames: int | None = None
    pool_frames: str = "none"

    @property
    def fixed(self) -> bool:
        """Every video has the same number of rows (K segments)."""
        return self.method == "segments"

    def indices(self, path: Path, frames: int, video_fps: float | None) -> list[int]:
        """The frame indices of a video of ``frames`` frames (a ValueError when it has none to give)."""
        if frames < 1:
            raise ValueError("0 frames: nothing to sample")
        if self.method == "segments":
            return tsn_indices(frames, self.segments, self.mode, video_rng(self.seed, path))
        found = rate_indices(frames, video_fps or 0.0, self.fps) if self.method == "fps" else \
            every_indices(frames, self.every)
        return found[:self.max_frames] if self.max_frames else found


def sampling_from(segments: int | None, fps: float | None, every: int | None, mode: str | None, seed: int,
                  max_frames: int | None, pool_frames: str | None) -> tuple[Sampling, bool]:
    """The options as a :class:`Sampling`, checked (``mode`` None: test; ``pool_frames`` None: none);
    the bool says the default (--segments 8) was taken."""
    pool_frames = pool_frames or "none"
    chosen = [o for o, v in (("--segments", segments), ("--fps", fps), ("--every", every)) if v is not None]
    if len(chosen) > 1:
        raise UsageError(f"give one of --segments, --fps and --every, not {' and '.join(chosen)}")
    mode = mode or "test"
    if mode not in ("test", "train"):
        raise UsageError(f"unknown --mode {mode!r}", hint="test or train")
    if pool_frames not in FRAME_POOLS:
        raise UsageError(f"unknown --pool-frames {pool_frames!r}", hint=f"choose from: {', '.join(FRAME_POOLS)}")
    if segments is not None and not 1 <= segments <= MAX_SEGMENTS:
        raise UsageError(f"--segments must be between 1 and {MAX_SEGMENTS}, not {segments}")
    if fps is not None and not fps > 0:
        raise UsageError(f"--fps must be above 0, not {fps}")
    if every is not None and every < 1:
        raise UsageError(f"--every must be 1 or more, not {every}")
    if max_frames is not None and max_frames < 1:
        raise UsageError(f"--max-frames must be 1 or more, not {max_frames}")
    if fps is not None or every is not None:
        if mode == "train":
            raise UsageError("--mode applies to --segments", hint="--fps and --every take the same frames every time")
        method = "fps" if fps is not None else "every"
        return Sampling(method, None, "test", seed, fps, every, max_frames, pool_frames), False
    if max_frames is not None:
        raise UsageError("--max-frames applies to --fps and --every", hint="--segments K already takes K frames")
    return Sampling("segments", segments or DEFAULT_SEGMENTS, mode, seed, None, None, None, pool_frames), segments is None


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedVideo:
    """One video as planned: its frame count and rate (metadata), the frames to extract, or why not."""

    path: Path
    frame_count: int | None
    fps: float | None
    seekable: bool
    indices: tuple[int, ...]
    error: str | None = None


def plan_video(path: Path, sampling: Sampling) -> PlannedVideo:
    """Read ``path``'s metadata (no frame decoded where the container says its count) and sample it."""
    row = probe(path)
    if not row["error"] and not row["frame_count"]:  # a stream without a count: count it once
        row = probe(path, exact=True)
        row["frame_count"] = row["exact_frame_count"]
    count, fps = row["frame_count"], row["fps"]
    if row["error"]:
        return PlannedVideo(path, count, fps, False, (), row["error"])
    try:
        indices = sampling.indices(path, count, fps)
    except ValueError as why:
        return PlannedVideo(path, count, fps, False, (), str(why))
    return PlannedVideo(path, count, fps, bool(row["seekable"]), tuple(indices))


def plan_videos(paths: Sequence[Path], sampling: Sampling, threads: int = 4) -> list[PlannedVideo]:
    """:func:`plan_video` of each path in order, read by threads (OpenCV opens files without the GIL)."""
    if threads <= 1 or len(paths) < 2:
        return [plan_video(p, sampling) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda p: plan_video(p, sampling), paths))


class Layout:
    """Where each planned video's frames go.

    Frame rows: video v's k-th sampled frame is row ``offsets[v] + k`` (K rows for every video
    with segments, an unreadable one too; its own count otherwise). The arrays hold those rows,
    as [videos, K, ...] for segments, or one row per video when ``pooled``.
    """

    def __init__(self, plan: Sequence[PlannedVideo], sampling: Sampling):
        self.plan, self.sampling = list(plan), sampling
        counts = [sampling.segments if sampling.fixed else len(v.indices) for v in self.plan]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.pooled = sampling.pool_frames != "none"
        self.rows = len(self.plan) if self.pooled else int(self.offsets[-1])  # of the arrays
        self.group = sampling.segments if sampling.fixed and not self.pooled else 1

    def frames(self, v: int) -> range:
        """Video ``v``'s frame rows."""
        return range(int(self.offsets[v]), int(self.offsets[v + 1]))

    def rows_of(self, v: int) -> range:
        """Video ``v``'s rows of the arrays."""
        return range(v, v + 1) if self.pooled else self.frames(v)

    def video_of(self, frame_rows: np.ndarray) -> np.ndarray:
        """The video of each frame row."""
        return np.searchsorted(self.offsets, frame_rows, side="right") - 1

    def pending(self, status: np.ndarray) -> list[int]:
        """The videos with rows still to write (a video without rows has none)."""
        return [v for v in range(len(self.plan)) if (status[self.rows_of(v).start:self.rows_of(v).stop] == PENDING).any()]

    def labels(self) -> list[str]:
        """Each frame row as a person reads it, for a --strict failure: ``clip.mp4, frame 12``."""
        found = []
        for v, video in enumerate(self.plan):
            indices = video.indices or ("?",) * len(self.frames(v))
            found += [f"{video.path}, frame {i}" for i in indices]
        return found

    def failed(self) -> tuple[list[int], dict[int, str]]:
        """The rows of videos that failed in planning, with their error (written before the run)."""
        bad = {row: v.error for i, v in enumerate(self.plan) if v.error for row in self.rows_of(i)}
        return list(bad), bad


# ------------------------------------------------------------------------------------------- decoding


class VideoFrames:
    """An iterable dataset of ``(uint8 crop, video, frame row, error)``: the loader workers share the
    ``videos`` (one in every ``workers``), each opening its videos and reaching only their sampled
    frames (checked seeks, as video-info). A frame that does not decode gives a zero crop and the
    error, for it and the frames after it."""

    def __init__(self, layout: Layout, videos: Sequence[int], crop: Any):
        self.layout, self.videos, self.crop = layout, list(videos), crop

    def __iter__(self) -> Iterator[tuple[Any, int, int, str]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        mine = self.videos if info is None else self.videos[info.id::info.num_workers]
        for v in mine:
            yield from self._video(v)

    def _video(self, v: int) -> Iterator[tuple[Any, int, int, str]]:
        import torch
        from PIL import Image

        video, rows = self.layout.plan[v], self.layout.frames(v)
        by_index: dict[int, list[int]] = {}
        for row, index in zip(rows, video.indices):
            by_index.setdefault(index, []).append(row)
        left = dict(by_index)  # the frames not given yet (a restarted seek gives some again: once is enough)
        cv = cv2()
        error = video.error
        if error is None:
            try:
                for index, frame in frames_at(video.path, list(by_index), video.fps, video.seekable):
                    for row in left.pop(index, ()):
                        crop = self.crop(Image.fromarray(cv.cvtColor(frame, cv.COLOR_BGR2RGB)))
                        yield crop, v, row, ""
            except (ValueError, OSError) as why:
                error = str(why)
        missing = [row for index in sorted(left) for row in left[index]] if by_index else list(rows)
        if missing:
            error = error or "the video ended early"
            blank = torch.zeros((self.crop.crop_size, self.crop.crop_size, 3), dtype=torch.uint8)
            for row in missing:
                yield blank, v, row, error


def frame_loader(layout: Layout, videos: Sequence[int], preprocess: Any, device: Any, *, batch_size: int | None,
                 workers: int) -> tuple[Any, Any]:
    """(loader, normalize) for THE inference loop, as :func:`~torchtool.core.infer.image_loader` for images:
    workers crop frames to uint8, the batch (frames of several videos) is normalised on the device."""
    from torch.utils.data import IterableDataset

    from torchtool.core import runtime
    from torchtool.core.data.loading import cap_workers, make_loader
    from torchtool.core.data.transforms import CenterCrop, Normalize

    class _Frames(VideoFrames, IterableDataset):
        pass

    crop = CenterCrop.of(preprocess)
    workers = min(cap_workers(workers), len(videos))  # a worker without a video would only cost its start
    loader = make_loader(_Frames(layout, videos, crop), batch_size or runtime.default_batch_size(device), workers,
                         pin_memory=device.type == "cuda")
    return loader, Normalize(preprocess.mean, preprocess.std, device)


# -------------------------------------------------------------------------------------------- pooling


def missing_frames(error: str, missing: int, total: int) -> str:
    """A video's error in index.csv: the first frame's reason and how many frames it cost."""
    return error if missing >= total else f"{error} ({missing} of {total} frames missing)"


class FramePool:
    """Frames -> one row per video: the mean or max over the frames that decoded, computed once all
    the video's frames are in, in frame order (the same bytes whatever brought them)."""

    def __init__(self, layout: Layout, how: str, normalize: bool):
        self.layout, self.how, self.normalize = layout, how, normalize
        self.parts: dict[int, dict[int, Any]] = {}  # video -> frame row -> {layer: features} (None: bad)
        self.errors: dict[int, str] = {}  # video -> its first frame error

    def add(self, rows: np.ndarray, feats: dict[str, np.ndarray], bad: dict[int, str]
            ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, str], dict[int, str]]:
        """Take a batch's good frame rows (with their features) and bad ones; return the finished
        videos as (rows, pooled features, bad videos, notes of partial videos) for FeatureStore.write."""
        for i, (row, v) in enumerate(zip(rows.tolist(), self.layout.video_of(rows).tolist())):
            self.parts.setdefault(v, {})[row] = {k: a[i] for k, a in feats.items()}
        for row, error in sorted(bad.items()):
            v = int(self.layout.video_of(np.asarray([row]))[0])
            self.parts.setdefault(v, {})[row] = None
            self.errors.setdefault(v, error)
        done = sorted(v for v, got in self.parts.items() if len(got) == len(self.layout.frames(v)))
        good_v, pooled, bad_v, notes = [], {}, {}, {}
        for v in done:
            frames = [self.parts[v][r] for r in self.layout.frames(v)]
            kept = [f for f in frames if f is not None]
            missing = len(frames) - len(kept)
            if not kept:
                bad_v[v] = missing_frames(self.errors[v], missing, len(frames))
            else:
                good_v.append(v)
                for name in kept[0]:
                    pooled.setdefault(name, []).append(self._pool(np.stack([f[name] for f in kept])))
                if missing:
                    notes[v] = missing_frames(self.errors[v], missing, len(frames))
            del self.parts[v]
            self.errors.pop(v, None)
        return (np.asarray(good_v, dtype=np.int64), {k: np.stack(v) for k, v in pooled.items()}, bad_v, notes)

    def _pool(self, frames: np.ndarray) -> np.ndarray:
        kind = frames.dtype
        values = frames.astype(np.float32).mean(axis=0) if self.how == "mean" else frames.astype(np.float32).max(axis=0)
        if self.normalize:  # each stored vector has unit length, as each frame's had
            values = values / max(float(np.linalg.norm(values)), 1e-12)
        return values.astype(kind)


# --------------------------------------------------------------------------------------------- results


def video_status(layout: Layout, status: np.ndarray, errors: dict[int, str]) -> list[tuple[str, str]]:
    """(status, error) of each video: ok, partial (some frames missing), skipped (nothing) or pending."""
    found = []
    names = {OK: "ok", SKIPPED: "skipped", PENDING: "pending"}
    for v, video in enumerate(layout.plan):
        rows = layout.rows_of(v)
        states = status[rows.start:rows.stop]
        if video.error and not len(states):
            found.append(("skipped", video.error))
        elif (states == PENDING).any():
            found.append(("pending", ""))
        elif layout.pooled:
            error = errors.get(v, "")
            found.append((names[int(states[0])] if not error or states[0] == SKIPPED else "partial", error))
        else:
            bad = np.flatnonzero(states == SKIPPED)
            if not len(bad):
                found.append(("ok", ""))
            else:
                first = errors.get(rows.start + int(bad[0]), "unreadable")
                found.append(("skipped" if len(bad) == len(states) else "partial",
                              missing_frames(first, len(bad), len(states))))
    return found


def video_index(layout: Layout, states: Sequence[tuple[str, str]]) -> str:
    """index.csv: ``path,status,frame_count,fps,indices,error``, one row per video in input order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "status", "frame_count", "fps", "indices", "error"])
    for video, (state, error) in zip(layout.plan, states):
        writer.writerow([os.fsdecode(video.path), state, "" if video.frame_count is None else video.frame_count,
                         "" if video.fps is None else f"{video.fps:g}", " ".join(map(str, video.indices)), error])
    return buf.getvalue()


def plan_digest(plan: Sequence[PlannedVideo]) -> str:
    """A hash of every video's planned frames: a resume must write the very same rows."""
    import hashlib

    text = "\n".join(f"{v.frame_count}|{v.fps}|{v.error}|{' '.join(map(str, v.indices))}" for v in plan)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
