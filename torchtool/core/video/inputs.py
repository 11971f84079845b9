"""Which videos to read: files, folders (walked, sorted), ``-`` (stdin) and list files, in order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchtool.core.files import find_inputs

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")


@dataclass(frozen=True)
class VideoInput:
    """A video to read, the input folder it was found under, and its frame folder (``--extract-frames``)."""

    path: Path
    root: Path
    frames: Path | None = None


def is_video_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def find_videos(paths: Sequence[str], list_file: str | os.PathLike | None = None) -> list[VideoInput]:
    """Command-line inputs as videos in order: a list file first, then each path (``-``: stdin)."""
    return [VideoInput(path, root) for path, root in
            find_inputs(paths, list_file, is_video_name, "videos", VIDEO_EXTENSIONS)]
