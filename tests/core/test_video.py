"""core.video: TSN sampling properties (hypothesis), exact frame counts, inputs in order, frame extraction."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.video_data import level, truncate, write_video
from torchtool.core.video import (
    VideoInput, extract_frames, find_videos, frame_paths, probe, tsn_indices, video_rng,
)

sizes = st.integers(min_value=1, max_value=5000)
segments = st.integers(min_value=1, max_value=64)


@given(n=sizes, k=segments, mode=st.sampled_from(["train", "test"]), seed=st.integers(0, 2**32))
def test_tsn_indices_are_k_sorted_and_in_range(n, k, mode, seed):
    indices = tsn_indices(n, k, mode, random.Random(seed))
    assert len(indices) == k
    assert indices == sorted(indices)
    assert all(0 <= i < n for i in indices)


@given(n=sizes, k=segments, seed=st.integers(0, 2**32))
def test_training_takes_one_frame_in_each_segment(n, k, seed):
    indices = tsn_indices(n, k, "train", random.Random(seed))
    if n >= k:
        assert all(s * n // k <= i < (s + 1) * n // k for s, i in enumerate(indices))
    assert indices == tsn_indices(n, k, "train", random.Random(seed))  # a seed gives the same frames


@given(n=sizes, k=segments)
def test_testing_takes_each_segments_middle(n, k):
    indices = tsn_indices(n, k, "test")
    tick = n / k
    for s, i in enumerate(indices):
        middle = tick * s + tick / 2
        assert i == min(n - 1, int(middle))  # the TSN/mmaction2 formula, 0-based
        assert abs(i - middle) <= 1  # ... which is the middle of segment s, to the frame
    assert indices == tsn_indices(n, k, "test")


def test_tsn_examples():
    assert tsn_indices(100, 3, "test") == [16, 50, 83]  # not 16, 49, 82 (the integer-division recipe)
    assert tsn_indices(2, 5, "test") == [0, 0, 1, 1, 1]
    few = tsn_indices(3, 8, "train", random.Random(0))
    assert len(few) == 8 and few == sorted(few) and set(few) <= {0, 1, 2}  # fewer frames than K: repeats
    rng = random.Random(1)
    assert len({tuple(tsn_indices(1000, 8, "train", rng)) for _ in range(5)}) == 5  # really random
    with pytest.raises(ValueError, match="0 frames"):
        tsn_indices(0, 3, "test")


def test_a_videos_seed_depends_on_its_path_not_its_order():
    a, b = VideoInput(Path("x/a.mp4"), Path("x")), VideoInput(Path("x/b.mp4"), Path("x"))
    first = tsn_indices(500, 4, "train", video_rng(7, a))
    tsn_indices(500, 4, "train", video_rng(7, b))
    assert tsn_indices(500, 4, "train", video_rng(7, a)) == first
    assert tsn_indices(500, 4, "train", video_rng(8, a)) != first


@pytest.mark.parametrize("name, fourcc, frames", [("v.mp4", "mp4v", 37), ("v.avi", "MJPG", 23), ("one.avi", "MJPG", 1)])
def test_exact_counts_what_was_written(tmp_path, name, fourcc, frames):
    path = write_video(tmp_path / name, frames, fourcc, size=(80, 60), fps=12.5)
    row = probe(VideoInput(path, tmp_path), exact=True)
    assert row["error"] is None
    assert (row["width"], row["height"], row["fps"]) == (80, 60, 12.5)
    assert row["exact_frame_count"] == frames == row["frame_count"] and row["count_mismatch"] is False
    assert row["duration"] == pytest.approx(frames / 12.5)
    assert row["codec"] in ({"mp4v", "FMP4"} if fourcc == "mp4v" else {"MJPG"})


def test_a_truncated_video_reports_both_counts(tmp_path):
    path = truncate(write_video(tmp_path / "cut.avi", 60, "MJPG"))
    row = probe(VideoInput(path, tmp_path), exact=True)
    assert row["error"] is None and row["frame_count"] == 60  # the container still says 60
    assert 0 < row["exact_frame_count"] < 60 and row["count_mismatch"] is True


@pytest.mark.parametrize("content, error", [(b"", "empty file (0 bytes)"),
                                            (b"not a video at all\n" * 100, "not a readable video")])
def test_bad_files_are_rows_with_an_error(tmp_path, content, error):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    row = probe(VideoInput(path, tmp_path), exact=True)
    assert error in row["error"] and row["width"] is None and row["exact_frame_count"] is None


def test_inputs_in_order(tmp_path, monkeypatch):
    root = tmp_path / "clips"
    for rel in ("b.mp4", "a.AVI", "sub/c.mkv", "notes.txt", "z/d.webm"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    found = find_videos([str(root)])
    assert [v.path.relative_to(root).as_posix() for v in found] == ["a.AVI", "b.mp4", "sub/c.mkv", "z/d.webm"]
    assert [v.relative.as_posix() for v in found] == ["a", "b", "sub/c", "z/d"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'z/d.webm'}\n{root / 'b.mp4'}\n")
    single = root / "sub" / "c.mkv"
    ordered = find_videos([str(single)], listing)
    assert [v.path.name for v in ordered] == ["d.webm", "b.mp4", "c.mkv"]  # the list first, then the paths
    assert ordered[2].relative == Path("c")


def test_extracted_frames_are_the_frames_at_those_indices(tmp_path):
    import cv2

    path = write_video(tmp_path / "in" / "clip.mp4", 90, "mp4v")
    video = VideoInput(path, tmp_path / "in")
    indices = [3, 4, 40, 88]  # forward grabs (3 -> 4), a seek (4 -> 40), a seek near the end
    assert extract_frames(video, indices, tmp_path / "out", quality=95) == 4
    files = frame_paths(video, tmp_path / "out", indices)
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == [
        "clip/000003.jpg", "clip/000004.jpg", "clip/000040.jpg", "clip/000088.jpg"]
    for index, file in zip(indices, files):
        image = cv2.imread(str(file))
        assert image.shape == (48, 64, 3)
        assert abs(float(np.mean(image)) - level(index)) < 3, (index, float(np.mean(image)))  # that frame, no other
    assert not list((tmp_path / "out").rglob(".*.tmp"))
    assert extract_frames(video, indices, tmp_path / "out") == 0  # all there: skipped
    files[1].unlink()
    assert extract_frames(video, indices, tmp_path / "out") == 4


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg writes the rotation tag (apt install ffmpeg)")
def test_rotation_is_reported_and_frames_come_out_upright(tmp_path):
    import subprocess

    import cv2

    plain = write_video(tmp_path / "plain.mp4", 12, "mp4v", size=(64, 48))
    for angle in (90, 180, 270):
        rotated = tmp_path / f"rot{angle}.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(plain), "-metadata:s:v:0", f"rotate={angle}",
                        "-c", "copy", str(rotated)], check=True)
        row = probe(VideoInput(rotated, tmp_path))
        assert (row["rotation"], row["width"], row["height"]) == (angle, 64, 48)  # as stored, as ffprobe says
        assert extract_frames(VideoInput(rotated, tmp_path), [5], tmp_path / "out") == 1
        shape = cv2.imread(str(tmp_path / "out" / f"rot{angle}" / "000005.jpg")).shape
        assert shape[:2] == ((64, 48) if angle in (90, 270) else (48, 64))  # upright, as a player shows it
    assert probe(VideoInput(plain, tmp_path))["rotation"] is None
