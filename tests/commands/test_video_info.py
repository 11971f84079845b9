"""torchtool video-info end to end: formats, input order (files, folders, stdin, --list), errors, TSN fields,
frame extraction, workers, and no torch import."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.video_data import truncate, write_video
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
    assert a["duration"] == 3.0 and a["codec"] == "MJPG" and a["error"] is None and a["count_mismatch"] is False
    d = by_name["d.avi"]
    assert d["frame_count"] == 40 and d["exact_frame_count"] < 40 and d["count_mismatch"] is True
    assert by_name["empty.mp4"]["error"] == "empty file (0 bytes)"
    assert "not a readable video" in by_name["text.mkv"]["error"]
    assert "2 of 6 videos could not be read" in result.stderr

    table = invoke(clips / "a.avi")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:6] == ["path", "width", "height", "fps", "frame_count", "duration"]
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
    assert written == ["a/000005.jpg", "a/000015.jpg", "a/000025.jpg", "c/000002.jpg", "c/000006.jpg",
                       "c/000010.jpg"] + [f"d/{i:06d}.jpg" for i in next(r for r in rows if r["path"].endswith(
                           "d.avi"))["indices"]]
    assert [r["frames_written"] for r in rows] == [3, 3, 3]
    again = json.loads(invoke(clips / "a.avi", clips / "sub", "--segments", "3", "--extract-frames", out,
                              "--json", "--exact").stdout)
    assert [r["frames_written"] for r in again] == [0, 0, 0]  # a rerun skips what is complete
    needs_k = invoke(clips / "a.avi", "--extract-frames", out)
    assert needs_k.exit_code == 2 and "--segments" in needs_k.stderr


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
