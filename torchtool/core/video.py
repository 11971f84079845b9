"""Video metadata with OpenCV, exact frame counts, TSN frame sampling and frame extraction (no torch).

- :func:`find_videos`: files, folders (walked, sorted), ``-`` (stdin) and list files, in order.
- :func:`probe`: one video's size, fps, container frame count, duration, FourCC, rotation;
  with ``exact`` the frames that really decode are counted (``grab``: demux and decode,
  no colour conversion), since a container's count can be wrong.
- :func:`tsn_indices`: K frame indices the TSN way (training: a random frame in each of K
  equal segments; testing: each segment's middle frame, mmaction2's formula).
- :func:`extract_frames`: the sampled frames as JPEGs, read by seeking and grabbing.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtool.core.files import atomic_write, find_inputs
from torchtool.core.output import UsageError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")
# Seeking costs a keyframe's decode; grabbing forward is cheaper when the next frame is this close.
SEEK_DISTANCE = 16


@dataclass(frozen=True)
class VideoInput:
    """A video to read, and the root its output frame folder is named relative to."""

    path: Path
    root: Path

    @property
    def relative(self) -> Path:
        """The path below its root, without the suffix (the frame folder's name)."""
        try:
            rel = self.path.relative_to(self.root)
        except ValueError:
            rel = Path(self.path.name)
        return rel.with_suffix("")


def is_video_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def find_videos(paths: Sequence[str], list_file: str | os.PathLike | None = None) -> list[VideoInput]:
    """Command-line inputs as videos in order: a list file first, then each path (``-``: stdin)."""
    return [VideoInput(path, root) for path, root in
            find_inputs(paths, list_file, is_video_name, "videos", VIDEO_EXTENSIONS)]


def cv2() -> Any:
    """OpenCV, with its own and FFmpeg's log lines off (a bad file is a row's error, not stderr noise)."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    import cv2 as module

    return module


def _fourcc(value: float) -> str | None:
    code = int(value)
    text = "".join(chr((code >> 8 * i) & 0xFF) for i in range(4))
    return text.strip("\x00 ") if code and text.isprintable() else None


def _open(path: Path) -> Any:
    """An opened cv2.VideoCapture, or a ValueError saying why not."""
    cv = cv2()
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size == 0:
        raise ValueError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ValueError("permission denied")
    cap = cv.VideoCapture(str(path), cv.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise ValueError("not a readable video (FFmpeg cannot open it)")
    return cap


def count_frames(cap: Any) -> int:
    """Frames that decode from the current position to the end (grab: no colour conversion)."""
    n = 0
    while cap.grab():
        n += 1
    return n


def probe(video: VideoInput, exact: bool = False) -> dict[str, Any]:
    """One row of metadata (``error`` set, the rest None, when the file is not a readable video)."""
    cv = cv2()
    row: dict[str, Any] = {"path": str(video.path), "width": None, "height": None, "fps": None,
                           "frame_count": None, "duration": None, "codec": None, "rotation": None}
    if exact:
        row |= {"exact_frame_count": None, "count_mismatch": None}
    try:
        cap = _open(video.path)
    except ValueError as why:
        return row | {"error": str(why)}
    try:
        width, height = int(cap.get(cv.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv.CAP_PROP_FPS))
        frames = max(0, int(cap.get(cv.CAP_PROP_FRAME_COUNT)))
        # OpenCV gives the display matrix's counter-clockwise angle and, rotating the frames it returns,
        # their displayed size; the row has what the file stores (as ffprobe): the coded size and the
        # clockwise rotation to display it (what `ffmpeg -metadata:s:v rotate=90` writes)
        meta = int(cap.get(cv.CAP_PROP_ORIENTATION_META)) if hasattr(cv, "CAP_PROP_ORIENTATION_META") else 0
        rotation = -meta % 360
        if rotation in (90, 270) and cap.get(cv.CAP_PROP_ORIENTATION_AUTO):
            width, height = height, width
        if width <= 0 or height <= 0:
            return row | {"error": "no video stream"}
        row |= {"width": width, "height": height, "fps": round(fps, 6) if fps > 0 else None, "frame_count": frames,
                "duration": round(frames / fps, 6) if fps > 0 else None, "codec": _fourcc(cap.get(cv.CAP_PROP_FOURCC)),
                "rotation": rotation or None}
        if exact:
            counted = count_frames(cap)
            row |= {"exact_frame_count": counted, "count_mismatch": counted != frames}
            if fps > 0:
                row["duration"] = round(counted / fps, 6)
    finally:
        cap.release()
    return row | {"error": None}


def tsn_indices(n: int, k: int, mode: str, rng: random.Random | None = None) -> list[int]:
    """K frame indices of a video of ``n`` frames, the TSN way (0-based, non-decreasing, each in [0, n)).

    ``test``: the middle of each of K equal segments, tick = n / K, index_k = int(tick / 2 + tick * k)
    (n = 100, K = 3: 16, 50, 83). ``train``: one random frame inside each segment
    [floor(i n / K), floor((i + 1) n / K)); with fewer frames than K, K sorted random frames
    with repeats.
    """
    if k < 1:
        raise UsageError("--segments must be at least 1")
    if n < 1:
        raise ValueError("0 frames: nothing to sample")
    if mode == "test":
        tick = n / k
        return [min(n - 1, int(tick / 2 + tick * i)) for i in range(k)]
    if mode != "train":
        raise UsageError(f"unknown --mode {mode!r}", hint="train or test")
    rng = rng or random.Random()
    if n < k:
        return sorted(rng.randrange(n) for _ in range(k))
    return [rng.randrange(i * n // k, (i + 1) * n // k) for i in range(k)]


def video_rng(seed: int, video: VideoInput) -> random.Random:
    """The generator of one video: from the seed and the video's own path, so neither the order nor the
    number of workers changes its indices."""
    return random.Random(f"{seed}:{video.path}")


def frame_paths(video: VideoInput, out: Path, indices: Sequence[int]) -> list[Path]:
    """OUT/<path relative to its input root, no suffix>/<index, 6 digits>.jpg, once per distinct index."""
    folder = out / video.relative
    return [folder / f"{i:06d}.jpg" for i in sorted(set(indices))]


def extract_frames(video: VideoInput, indices: Sequence[int], out: Path, quality: int = 95) -> int:
    """Write the frames at ``indices`` as JPEGs (atomically each); returns how many were written.

    Frames are reached by seeking (CAP_PROP_POS_FRAMES) or, when the next one is close, by
    grabbing forward; only the wanted frames are converted and encoded.
    """
    cv = cv2()

    wanted = sorted(set(indices))
    targets = frame_paths(video, out, wanted)
    if all(t.exists() for t in targets):
        return 0
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    cap = _open(video.path)
    written, position = 0, 0  # position: the index of the frame the next grab returns
    try:
        for index, target in zip(wanted, targets):
            if index < position or index - position > SEEK_DISTANCE:
                cap.set(cv.CAP_PROP_POS_FRAMES, index)
                position = index
            while position < index and cap.grab():
                position += 1
            if not cap.grab():
                raise ValueError(f"frame {index} does not decode")
            position += 1
            ok, frame = cap.retrieve()
            if not ok:
                raise ValueError(f"frame {index} does not decode")
            ok, data = cv.imencode(".jpg", frame, [cv.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError(f"frame {index} could not be encoded as JPEG")
            with atomic_write(target, "wb") as fh:
                fh.write(data.tobytes())
            written += 1
    finally:
        cap.release()
    return written


@dataclass
class VideoConfig:
    """What ``torchtool video-info`` was asked for."""

    exact: bool = False
    segments: int | None = None
    mode: str = "test"
    seed: int = 0
    extract_frames: str | None = None
    quality: int = 95


def describe(video: VideoInput, cfg: VideoConfig) -> dict[str, Any]:
    """One video's row: metadata, and with ``segments`` its TSN ``indices`` (and frames written)."""
    row = probe(video, cfg.exact)
    if cfg.segments is not None:
        _sample(row, video, cfg)
    row["error"] = row.pop("error")  # the last column
    return row


def _sample(row: dict[str, Any], video: VideoInput, cfg: VideoConfig) -> None:
    if row["error"]:
        return
    n = row["exact_frame_count"] if cfg.exact else row["frame_count"]
    try:
        row["indices"] = tsn_indices(n, cfg.segments, cfg.mode, video_rng(cfg.seed, video))
        if cfg.extract_frames:
            row["frames_dir"] = str(Path(cfg.extract_frames) / video.relative)
            row["frames_written"] = extract_frames(video, row["indices"], Path(cfg.extract_frames), cfg.quality)
    except ValueError as why:
        row["error"] = str(why)
    except OSError as exc:
        row["error"] = f"cannot write frames: {exc.strerror or exc}"


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
