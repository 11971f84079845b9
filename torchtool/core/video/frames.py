"""``--extract-frames``: each video's frames in a folder of its own, written atomically, complete or not at all.

- :func:`frame_folders`: OUT/<the video's path below its input folder, suffix kept>; with
  inputs from several folders, their paths below the folder they share. Two videos that
  would still share a folder are refused before anything is decoded, and every folder is
  checked writable then too (:func:`check_folders`).
- :func:`extract_frames`: the frames as JPEGs through the atomic write path, then a manifest
  (the video's fingerprint, indices, quality, files). A rerun skips a folder whose manifest
  matches; one holding another video's frames, or other indices, is refused unless
  ``overwrite`` (then only the files the manifest lists are removed). A video that fails
  midway leaves none of this run's frames behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from torchtool.core.files import atomic_write, atomic_write_text, nearest_folder, writable_dir
from torchtool.core.output import UsageError
from torchtool.core.video.capture import cv2, frames_at

MANIFEST = ".torchtool-frames.json"
_SAMPLE = 1 << 16  # the fingerprint reads this much at each end of the file


def frame_folders(videos: Sequence[tuple[Path, Path]], out: Path) -> list[Path]:
    """The frame folder of each (video, input folder); a UsageError when two videos would share one."""
    roots = {os.path.abspath(root) for _, root in videos}
    base = os.path.commonpath(roots) if len(roots) > 1 else None
    folders, seen = [], {}
    for path, root in videos:
        try:
            rel = path.relative_to(root)
        except ValueError:
            rel = Path(path.name)
        if base is not None:
            rel = Path(os.path.relpath(os.path.abspath(root), base)) / rel
        folder = out / rel
        if folder in seen:
            raise UsageError(f"{seen[folder]} and {path} would write their frames to the same folder {folder}",
                             hint="give each video once, or run them with different --extract-frames folders")
        seen[folder] = path
        folders.append(folder)
    return folders


def check_folders(folders: Sequence[Path], what: str = "--extract-frames") -> None:
    """Before any decoding: each folder is (or can become) a folder this process can write in."""
    probed: set[Path] = set()
    for folder in folders:
        nearest = nearest_folder(folder)
        if nearest == folder or nearest not in probed:  # a file in the way is refused by writable_dir
            writable_dir(folder, what)
            probed.add(nearest)


def fingerprint(path: Path) -> str:
    """The file's size and a hash of its first and last 64 KiB: the same video, wherever it was moved."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest = hashlib.sha1(fh.read(_SAMPLE))
        fh.seek(max(0, size - _SAMPLE))
        digest.update(fh.read(_SAMPLE))
    return f"{size}:{digest.hexdigest()}"


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove(folder: Path, names: Sequence[str]) -> None:
    for name in names:
        if Path(name).name == name and name.endswith(".jpg"):  # only frames, only in this folder
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()


def extract_frames(path: Path, folder: Path, indices: Sequence[int], fps: float | None, seekable: bool,
                   quality: int = 95, overwrite: bool = False) -> int:
    """Write the frames at ``indices`` as ``folder/<index, 6 digits>.jpg``; returns how many were written
    (0: the folder already holds them); a ValueError for a frame that cannot be reached."""
    wanted = sorted(set(indices))
    record = {"video": str(path), "fingerprint": fingerprint(path), "indices": wanted, "quality": quality,
              "frames": [f"{i:06d}.jpg" for i in wanted]}
    old = _manifest(folder)
    same = old is not None and all(old.get(k) == record[k] for k in ("fingerprint", "indices", "quality"))
    if same and all((folder / name).exists() for name in record["frames"]):
        return 0
    if old is not None and not same:
        if not overwrite:
            what = "another video" if old.get("fingerprint") != record["fingerprint"] else "other frames"
            raise ValueError(f"{folder} holds {what} ({old.get('video')}): pass --overwrite to replace them")
        _remove(folder, old.get("frames", []))
        (folder / MANIFEST).unlink()
    cv = cv2()
    written: set[str] = set()
    try:
        for index, frame in frames_at(path, wanted, fps, seekable):
            ok, data = cv.imencode(".jpg", frame, [cv.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError(f"frame {index} could not be encoded as JPEG")
            name = f"{index:06d}.jpg"
            with atomic_write(folder / name, "wb") as fh:
                fh.write(data.tobytes())
            written.add(name)
        atomic_write_text(folder / MANIFEST, json.dumps(record, indent=1) + "\n")
    except BaseException:  # a frame that cannot be reached, a full disk, Ctrl-C: no folder that looks done
        _remove(folder, sorted(written))
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
        raise
    return len(written)
