"""core.video: TSN sampling properties (hypothesis), metadata and exact counts, inputs in order, frame extraction
(the frames checked by the index drawn into each), damaged files, MPEG-TS and VFR (these need ffmpeg)."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.video_data import ffmpeg, ffprobe, read_index, truncate, write_video
from torchtool.core.output import UsageError
from torchtool.core.video import (
    MAX_SEGMENTS, extract_frames, find_videos, frame_folders, frames_at, probe, tsn_indices, video_rng,
)
from torchtool.core.video.frames import MANIFEST

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
    with pytest.raises(UsageError, match=f"between 1 and {MAX_SEGMENTS}"):
        tsn_indices(100, MAX_SEGMENTS + 1, "test")  # --segments 1000000000 was a MemoryError after minutes


def test_a_videos_seed_depends_on_its_path_not_its_order():
    a, b = Path("x/a.mp4"), Path("x/b.mp4")
    first = tsn_indices(500, 4, "train", video_rng(7, a))
    tsn_indices(500, 4, "train", video_rng(7, b))
    assert tsn_indices(500, 4, "train", video_rng(7, a)) == first
    assert tsn_indices(500, 4, "train", video_rng(8, a)) != first



def _extract(path: Path, folder: Path, indices, overwrite=False) -> int:
    row = probe(path)
    return extract_frames(path, folder, indices, row["fps"], row["seekable"], overwrite=overwrite)


def _indices_in(folder: Path) -> dict[int, int]:
    import cv2

    return {int(f.stem): read_index(cv2.imdecode(np.fromfile(f, np.uint8), cv2.IMREAD_COLOR))  # any name
            for f in sorted(folder.glob("*.jpg"))}


@pytest.mark.parametrize("name, fourcc, frames", [("v.mp4", "mp4v", 37), ("v.avi", "MJPG", 23), ("one.avi", "MJPG", 1)])
def test_exact_counts_what_was_written(tmp_path, name, fourcc, frames):
    path = write_video(tmp_path / name, frames, fourcc, size=(80, 60), fps=12.5)
    row = probe(path, exact=True)
    assert row["error"] is None
    assert (row["width"], row["height"], row["fps"], row["avg_fps"]) == (80, 60, 12.5, 12.5)
    assert row["exact_frame_count"] == frames == row["frame_count"] and row["count_mismatch"] is False
    assert row["duration"] == pytest.approx(frames / 12.5)
    assert (row["codec"], row["fourcc"] in {"mp4v", "FMP4", "MJPG"}) == ("mpeg4" if fourcc == "mp4v" else "mjpeg", True)
    assert row["vfr"] is False


def test_a_truncated_video_reports_both_counts(tmp_path):
    path = truncate(write_video(tmp_path / "cut.avi", 60, "MJPG"))
    row = probe(path, exact=True)
    assert row["error"] is None and row["frame_count"] == 60  # the container still says 60
    assert 0 < row["exact_frame_count"] < 60 and row["count_mismatch"] is True


@pytest.mark.parametrize("content, error", [(b"", "empty file (0 bytes)"),
                                            (b"not a video at all\n" * 100, "not a readable video")])
def test_bad_files_are_rows_with_an_error(tmp_path, content, error):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    row = probe(path, exact=True)
    assert error in row["error"] and row["width"] is None and row["exact_frame_count"] is None


def test_a_photo_named_mp4_is_not_a_video(tmp_path):
    import cv2

    from tests.video_data import frame

    cv2.imwrite(str(tmp_path / "photo.jpg"), frame(3))
    (tmp_path / "photo.jpg").rename(tmp_path / "photo.mp4")  # FFmpeg opens it: one frame, a garbage count
    row = probe(tmp_path / "photo.mp4", exact=True)
    assert row["error"] == "not a video (a JPEG image)" and row["frame_count"] is None


def test_inputs_in_order(tmp_path, monkeypatch):
    root = tmp_path / "clips"
    for rel in ("b.mp4", "a.AVI", "sub/c.mkv", "notes.txt", "z/d.webm"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    found = find_videos([str(root)])
    assert [v.path.relative_to(root).as_posix() for v in found] == ["a.AVI", "b.mp4", "sub/c.mkv", "z/d.webm"]
    folders = frame_folders([(v.path, v.root) for v in found], tmp_path / "out")
    assert [f.relative_to(tmp_path / "out").as_posix() for f in folders] == ["a.AVI", "b.mp4", "sub/c.mkv", "z/d.webm"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'z/d.webm'}\n{root / 'b.mp4'}\n")
    single = root / "sub" / "c.mkv"
    ordered = find_videos([str(single)], listing)
    assert [v.path.name for v in ordered] == ["d.webm", "b.mp4", "c.mkv"]  # the list first, then the paths


def test_frame_folders_never_collide(tmp_path):
    out = tmp_path / "out"
    two_roots = [(Path("d1/clip.avi"), Path("d1")), (Path("d2/clip.avi"), Path("d2"))]
    assert frame_folders(two_roots, out) == [out / "d1" / "clip.avi", out / "d2" / "clip.avi"]  # the roots kept
    one_folder = [(Path("v/a.mp4"), Path("v")), (Path("v/a.avi"), Path("v"))]
    assert frame_folders(one_folder, out) == [out / "a.mp4", out / "a.avi"]  # the suffix kept
    with pytest.raises(UsageError, match="same folder"):
        frame_folders([(Path("v/a.mp4"), Path("v")), (Path("v/a.mp4"), Path("v"))], out)


def test_extracted_frames_are_the_frames_at_those_indices(tmp_path):
    path = write_video(tmp_path / "in" / "clip.mp4", 90, "mp4v")
    folder = tmp_path / "out" / "clip.mp4"
    indices = [3, 4, 40, 88]  # forward grabs (3 -> 4), a seek (4 -> 40), a seek near the end
    assert _extract(path, folder, indices) == 4
    assert _indices_in(folder) == {i: i for i in indices}  # that frame, no other
    assert not list((tmp_path / "out").rglob(".*.tmp"))
    assert _extract(path, folder, indices) == 0  # all there, of this video: skipped
    (folder / "000004.jpg").unlink()
    assert _extract(path, folder, indices) == 4


def test_a_folder_of_another_video_is_not_taken_for_done(tmp_path):
    path = write_video(tmp_path / "clip.avi", 40, "MJPG")
    folder = tmp_path / "out" / "clip.avi"
    assert _extract(path, folder, [5, 20]) == 2
    write_video(path, 60, "MJPG", size=(80, 60))  # another video under the same name: same frame file names
    with pytest.raises(ValueError, match="holds another video"):
        _extract(path, folder, [5, 20])
    assert _extract(path, folder, [5, 50], overwrite=True) == 2
    assert _indices_in(folder) == {5: 5, 50: 50}  # the old 000020.jpg (listed in the manifest) removed
    with pytest.raises(ValueError, match="holds other frames"):
        _extract(path, folder, [6, 50])


def test_a_frame_past_the_damage_is_an_error_and_leaves_no_frames(tmp_path):
    path = truncate(write_video(tmp_path / "cut.avi", 60, "MJPG"))  # the index still promises 60
    folder = tmp_path / "out" / "cut.avi"
    with pytest.raises(ValueError, match="frame 55 does not decode"):
        _extract(path, folder, [2, 10, 55])
    assert not folder.exists()  # not frames 2 and 10 in a folder that looks like a video's frames


def test_reading_frames_never_passes_opencv_a_name_it_cannot_take(tmp_path):
    import os

    source = write_video(tmp_path / "clip.avi", 30, "MJPG")
    name = tmp_path / os.fsdecode(b"caf\xe9.avi")  # not UTF-8: OpenCV given this str dies with SIGSEGV
    source.rename(name)
    row = probe(name, exact=True)
    assert (row["error"], row["exact_frame_count"]) == (None, 30)
    assert [i for i, image in frames_at(name, [3, 27], row["fps"], row["seekable"])] == [3, 27]


# --- what only FFmpeg writes: MPEG-TS, damaged H.264, VFR, rotation, audio-only, other codecs ------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("src") / "src.avi", 600, "MJPG")


def test_mpeg_ts_frames_are_the_frames_asked_for(source, tmp_path):
    ts = tmp_path / "clip.ts"
    ffmpeg("-i", source, "-c:v", "libx264", "-crf", "10", "-pix_fmt", "yuv420p", ts)  # keyframes 250 apart
    indices = tsn_indices(600, 8, "test")
    assert _extract(ts, tmp_path / "out", indices) == 8
    assert _indices_in(tmp_path / "out") == {i: i for i in indices}  # OpenCV's seek lands on frame 250


def test_a_truncated_h264_file_counts_as_ffprobe_and_never_copies_frames(source, tmp_path):
    mp4 = tmp_path / "cut.mp4"
    ffmpeg("-i", source, "-c:v", "libx264", "-crf", "10", "-pix_fmt", "yuv420p", "-movflags", "+faststart", mp4)
    truncate(mp4)
    decoded = int(ffprobe(mp4, "stream=nb_read_frames", "-count_frames"))
    row = probe(mp4, exact=True)
    assert row["exact_frame_count"] == decoded < 600  # the decoder's last frames are drained too
    reachable = [decoded // 2, decoded - 1]
    assert _extract(mp4, tmp_path / "ok", reachable) == 2
    assert _indices_in(tmp_path / "ok") == {i: i for i in reachable}
    with pytest.raises(ValueError, match=f"frame {decoded + 5} does not decode"):
        _extract(mp4, tmp_path / "bad", [decoded - 1, decoded + 5])  # OpenCV hands back the last frame again
    assert not (tmp_path / "bad").exists()


def test_variable_frame_rate(source, tmp_path):
    vfr = tmp_path / "vfr.mp4"  # 60 frames at 30 fps, then 20 at 10 fps: 4 s
    ffmpeg("-r", "30", "-i", source, "-frames:v", "80", "-vf", r"setpts='if(lt(N\,60)\,N/30\,2+(N-60)/10)/TB'",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", "-vsync", "passthrough", "-video_track_timescale",
           "90000", vfr)
    row = probe(vfr)
    assert row["vfr"] is True and row["frame_count"] == 80
    assert row["duration"] == pytest.approx(float(ffprobe(vfr, "stream=duration")), abs=0.01)
    assert row["duration"] > 80 / 30 + 1  # not frames / nominal rate
    assert row["fps"] == pytest.approx(30)  # the rate most frames are at; the average as ffprobe's:
    assert row["avg_fps"] == pytest.approx(float(Fraction(ffprobe(vfr, "stream=avg_frame_rate"))), abs=1e-3)
    assert row["seekable"] is False  # frame N is the N-th decoded, not the one at N / fps
    assert _extract(vfr, tmp_path / "out", [10, 65, 79]) == 3
    assert _indices_in(tmp_path / "out") == {10: 10, 65: 65, 79: 79}
    mkv = tmp_path / "vfr.mkv"
    ffmpeg("-i", vfr, "-c", "copy", mkv)
    exact = probe(mkv, exact=True)  # no frame table: the frames' own timestamps
    assert exact["vfr"] is True and exact["exact_frame_count"] == 80
    assert exact["duration"] == pytest.approx(float(ffprobe(mkv, "format=duration")), abs=0.05)
    assert exact["fps"] == pytest.approx(30, abs=0.5) and exact["avg_fps"] == pytest.approx(20, abs=0.5)


def test_rotation_is_the_clockwise_angle_and_frames_come_out_upright(tmp_path):
    import cv2

    plain = write_video(tmp_path / "plain.mp4", 12, "mp4v", size=(64, 48))
    for tag in (90, 180, 270):
        rotated = tmp_path / f"rot{tag}.mp4"
        ffmpeg("-i", plain, "-metadata:s:v:0", f"rotate={tag}", "-c", "copy", rotated)
        counter_clockwise = float(ffprobe(rotated, "stream_side_data=rotation"))  # the display matrix's angle
        row = probe(rotated)
        assert (row["rotation"], row["width"], row["height"]) == (round(-counter_clockwise) % 360, 64, 48)
        assert _extract(rotated, tmp_path / f"out{tag}", [5]) == 1
        shape = cv2.imread(str(tmp_path / f"out{tag}" / "000005.jpg")).shape
        assert shape[:2] == ((64, 48) if tag in (90, 270) else (48, 64))  # upright, as a player shows it
    assert probe(plain)["rotation"] is None


@pytest.mark.parametrize("codec, encoder, name", [("h264", "libx264", "a.mp4"), ("hevc", "libx265", "a.mp4"),
                                                  ("vp9", "libvpx-vp9", "a.webm"), ("av1", "libaom-av1", "a.mkv")])
def test_codec_names(source, tmp_path, codec, encoder, name):
    path = tmp_path / name
    ffmpeg("-i", source, "-frames:v", "10", "-c:v", encoder, *(["-cpu-used", "8"] if codec == "av1" else []), path)
    row = probe(path)
    assert row["codec"] == codec == ffprobe(path, "stream=codec_name") and row["fourcc"]


def test_an_audio_only_file_has_no_video_stream(tmp_path):
    audio = tmp_path / "song.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", audio)
    assert probe(audio)["error"] == "no video stream"
