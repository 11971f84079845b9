"""torchtool video-info end to end: formats, input order (files, folders, stdin, --list), errors, TSN fields,
frame extraction, workers, and no torch import."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.video_data import read_index, truncate, write_video
from torchtool.cli import app

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, ["video-info", *map(str, args)], input=input)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "b.mp4", 50, "mp4v")
    write_video(root / "a.avi", 30, "MJPG", size=(32, 24), fps=10)
    write_video(root / "sub" / "c.MOV", 12, "mp4v")
    truncate(write_video(root / "sub" / "d.avi", 40, "MJPG"))
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mkv").write_text("not a video\n" * 40)
    (root / "readme.txt").write_text("not listed: not a video name")
    return root


def test_table_json_and_csv(clips):
    result = invoke(clips, "--exact", "--json", "-q")
    assert result.exit_code == 3, result.output  # two files are not videos
    rows = json.loads(result.stdout)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert [Path(r["path"]).relative_to(clips).as_posix() for r in rows] == [
        "a.avi", "b.mp4", "empty.mp4", "text.mkv", "sub/c.MOV", "sub/d.avi"]  # each folder, then its sub-folders
    a = by_name["a.avi"]
    assert (a["width"], a["height"], a["fps"], a["frame_count"], a["exact_frame_count"]) == (32, 24, 10.0, 30, 30)
    assert a["duration"] == 3.0 and (a["codec"], a["fourcc"]) == ("mjpeg", "MJPG") and a["error"] is None and a["count_mismatch"] is False
    d = by_name["d.avi"]
    assert d["frame_count"] == 40 and d["exact_frame_count"] < 40 and d["count_mismatch"] is True
    assert by_name["empty.mp4"]["error"] == "empty file (0 bytes)"
    assert "not a readable video" in by_name["text.mkv"]["error"]
    assert "2 of 6 videos could not be read" in result.stderr

    table = invoke(clips / "a.avi")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:8] == ["path", "width", "height", "fps", "avg_fps", "vfr", "frame_count",
                                                       "duration"]
    rows = list(csv.DictReader(io.StringIO(invoke(clips / "a.avi", clips / "b.mp4", "--format", "csv").stdout)))
    assert [r["frame_count"] for r in rows] == ["30", "50"]


def test_stdin_and_list_keep_their_order(clips, tmp_path):
    names = ["sub/c.MOV", "a.avi", "b.mp4"]
    stdin = "".join(f"{clips / n}\n" for n in names)
    result = invoke("-", "--json", input=stdin)
    assert [Path(r["path"]).name for r in json.loads(result.stdout)] == ["c.MOV", "a.avi", "b.mp4"]
    listing = tmp_path / "videos.txt"
    listing.write_text("".join(f"{clips / n}\n" for n in reversed(names)) + f"{clips / 'missing.mp4'}\n")
    result = invoke("--list", listing, "--format", "jsonl")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["b.mp4", "a.avi", "c.MOV", "missing.mp4"]
    assert result.exit_code == 3 and "No such file" in rows[-1]["error"]  # a listed path that is gone: a row


def test_strict_fails_on_the_first_bad_file(clips):
    result = invoke(clips, "--strict")
    assert result.exit_code == 1 and result.stdout == ""
    assert "empty.mp4: empty file (0 bytes)" in result.stderr  # the first in input order


def test_segments_are_deterministic_across_workers(clips):
    def indices(*extra):
        rows = json.loads(invoke(clips, "--segments", "4", "--json", *extra).stdout)
        return {Path(r["path"]).name: r.get("indices") for r in rows}

    one = indices("--mode", "train", "--seed", "3", "--workers", "1")
    assert one == indices("--mode", "train", "--seed", "3", "--workers", "4")
    assert one != indices("--mode", "train", "--seed", "4", "--workers", "4")
    test = indices("--exact")
    assert test["b.mp4"] == [6, 18, 31, 43] and test["c.MOV"] == [1, 4, 7, 10]
    assert test["empty.mp4"] is None  # no frames to sample from a file that is not a video
    assert all(0 <= i < 40 for i in test["d.avi"])  # the exact count, not the container's, bounds them


def test_extract_frames_writes_a_training_ready_folder(clips, tmp_path):
    out = tmp_path / "frames"
    # --exact: the truncated d.avi's container promises 40 frames; the indices must come from those that decode
    result = invoke(clips / "a.avi", clips / "sub", "--segments", "3", "--extract-frames", out, "--json",
                    "--quality", "90", "--exact")
    rows = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    # two inputs: each video's folder keeps its input folder and its suffix
    d_indices = next(r for r in rows if r["path"].endswith("d.avi"))["indices"]
    assert written == ["a.avi/000005.jpg", "a.avi/000015.jpg", "a.avi/000025.jpg", "sub/c.MOV/000002.jpg",
                       "sub/c.MOV/000006.jpg", "sub/c.MOV/000010.jpg"] + [f"sub/d.avi/{i:06d}.jpg" for i in d_indices]
    assert [r["frames_written"] for r in rows] == [3, 3, 3]
    again = json.loads(invoke(clips / "a.avi", clips / "sub", "--segments", "3", "--extract-frames", out,
                              "--json", "--exact", "--quality", "90").stdout)
    assert [r["frames_written"] for r in again] == [0, 0, 0]  # the same command again skips what is complete
    other = json.loads(invoke(clips / "a.avi", "--segments", "4", "--extract-frames", out, "--json").stdout)
    assert "holds other frames" in other[0]["error"] and "--overwrite" in other[0]["error"]
    replaced = json.loads(invoke(clips / "a.avi", "--segments", "4", "--extract-frames", out, "--json",
                                 "--overwrite").stdout)
    assert replaced[0]["frames_written"] == 4 and len(list((out / "a.avi").glob("*.jpg"))) == 4
    needs_k = invoke(clips / "a.avi", "--extract-frames", out)
    assert needs_k.exit_code == 2 and "--segments" in needs_k.stderr


def test_segments_beyond_the_bound_are_a_usage_error(clips):
    result = invoke(clips / "a.avi", "--segments", "1000000000")
    assert result.exit_code == 2 and "--segments" in result.stderr and result.stdout == ""  # not minutes, then MemoryError


def _frames(folder: Path) -> dict[int, int]:
    import cv2

    return {int(f.stem): read_index(cv2.imdecode(np.fromfile(f, np.uint8), cv2.IMREAD_COLOR))  # any name
            for f in sorted(folder.glob("*.jpg"))}


def test_same_named_videos_never_share_a_frame_folder(tmp_path):
    write_video(tmp_path / "d1" / "clip.avi", 40, "MJPG")
    write_video(tmp_path / "d2" / "clip.avi", 80, "MJPG")
    write_video(tmp_path / "v" / "a.mp4", 30, "mp4v")
    write_video(tmp_path / "v" / "a.avi", 60, "MJPG")
    out = tmp_path / "frames"
    result = invoke(tmp_path / "d1", tmp_path / "d2", "--segments", "2", "--extract-frames", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert [r["frames_written"] for r in json.loads(result.stdout)] == [2, 2]
    assert _frames(out / "d1" / "clip.avi") == {10: 10, 30: 30} and _frames(out / "d2" / "clip.avi") == {20: 20, 60: 60}
    one = invoke(tmp_path / "v", "--segments", "2", "--extract-frames", tmp_path / "f2", "--json", "-q")
    assert [r["frames_written"] for r in json.loads(one.stdout)] == [2, 2]
    assert _frames(tmp_path / "f2" / "a.avi") == {15: 15, 45: 45} and _frames(tmp_path / "f2" / "a.mp4") == {7: 7, 22: 22}
    twice = invoke(tmp_path / "v", tmp_path / "v" / "a.mp4", "--segments", "2", "--extract-frames", tmp_path / "f3")
    assert twice.exit_code == 2 and "same folder" in twice.stderr and not (tmp_path / "f3").exists()


def test_every_frame_folder_is_checked_before_decoding(tmp_path):
    write_video(tmp_path / "v" / "a.avi", 20, "MJPG")
    write_video(tmp_path / "v" / "b.avi", 20, "MJPG")
    out = tmp_path / "frames"
    out.mkdir()
    (out / "b.avi").write_text("a file where b.avi's frames would go")
    result = invoke(tmp_path / "v", "--segments", "2", "--extract-frames", out)
    assert result.exit_code == 2 and "is a file" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["b.avi"]  # a.avi, first in order, was not decoded either


def test_a_name_that_is_not_utf8_is_read_end_to_end(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "v"
    write_video(folder / "x.avi", 30, "MJPG").rename(folder / os.fsdecode(b"caf\xe9.avi"))
    write_video(folder / "z.avi", 20, "MJPG")
    exe = Path(sys.executable).with_name("torchtool")
    proc = subprocess.run([str(exe), "video-info", str(folder), "--exact", "--segments", "3", "--mode", "train",
                           "--extract-frames", str(tmp_path / "out"), "--json", "-q"], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")  # not 139: OpenCV never sees the surrogate
    rows = json.loads(proc.stdout)
    assert os.fsencode(rows[0]["path"]) == os.fsencode(folder) + b"/caf\xe9.avi"
    assert [r["exact_frame_count"] for r in rows] == [30, 20]
    frames = _frames(tmp_path / "out" / os.fsdecode(b"caf\xe9.avi"))
    assert sorted(frames) == sorted(set(rows[0]["indices"])) and all(k == v for k, v in frames.items())


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    import resource
    import subprocess
    import sys

    write_video(tmp_path / "v" / "a.avi", 20, "MJPG")
    exe = Path(sys.executable).with_name("torchtool")

    def small_files():  # a write past 400 bytes (a JPEG's header) fails with EFBIG, as on a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))

    proc = subprocess.run([str(exe), "video-info", str(tmp_path / "v"), "--segments", "2", "--extract-frames",
                           str(tmp_path / "out"), "-q"], capture_output=True, text=True, preexec_fn=small_files)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("torchtool: error: file too large while writing") and "Traceback" not in proc.stderr
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []  # no temporary file, no frame


def test_zero_frame_video_and_missing_inputs(tmp_path):
    empty = write_video(tmp_path / "none.avi", 0, "MJPG")
    result = invoke(empty, "--segments", "2", "--json")
    row = json.loads(result.stdout)[0]
    assert result.exit_code == 3 and row["error"]  # opened or not, it is reported, never a traceback
    assert row.get("frame_count") in (None, 0)
    missing = invoke(tmp_path / "nope.mp4")
    assert missing.exit_code == 2 and "no such file or directory" in missing.stderr
    (tmp_path / "emptydir").mkdir()
    nothing = invoke(tmp_path / "emptydir")
    assert nothing.exit_code == 2 and "no videos found" in nothing.stderr


def test_no_torch_is_imported(clips, run_python):
    probe = textwrap.dedent(f"""
        import sys
        from torchtool.cli import main
        try:
            main(["video-info", {str(clips)!r}, "--exact", "--segments", "3", "--json"])
        except SystemExit:
            pass
        print(sorted(m for m in ("torch", "torchvision", "sklearn", "matplotlib") if m in sys.modules))
    """)
    proc = run_python("-c", probe)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:] + proc.stderr[-500:]
