"""torchtool extract-features on videos: sampled frames against OpenCV's own decode run as images, the
output layouts (segments, fps/every + offsets, pooled), bad videos, option errors, resume, torchrun."""

from __future__ import annotations

import csv
import json
import math
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.commands.test_extract_features import SIZE, index, invoke, load, small  # the same CLI helpers
from tests.conftest import GENEROUS_S
from tests.video_data import decode_all, read_index, truncate, write_scene_video
from torchtool.cli import app
from torchtool.core.output import EXIT_FAILURE, EXIT_PARTIAL, EXIT_USAGE

pytest.importorskip("torch")
pytest.importorskip("cv2")

COLUMNS = ["path", "status", "frame_count", "fps", "indices", "error"]
TOL = 1e-4  # the bound on |video features - the same frame's features as an image|


def indices(row: dict[str, str]) -> list[int]:
    return [int(i) for i in row["indices"].split()]


def sampling(out: Path) -> dict:
    info = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert info["input"] == "videos"
    return info["sampling"]


def video_info(*args) -> list[dict]:
    """video-info's rows (--json): the indices and metadata extract-features must agree with."""
    result = CliRunner().invoke(app, ["video-info", *map(str, args), "--json"])
    assert result.exit_code in (0, EXIT_PARTIAL), result.output
    return json.loads(result.stdout)


def fps_indices(frame_count: int, fps: float, every_s: float) -> list[int]:
    """The spec of --fps F: t_j = j / F while t_j < duration; index floor(t_j * fps + 1e-6), duplicates dropped."""
    found: list[int] = []
    j = 0
    while j / every_s < frame_count / fps:
        i = math.floor(j / every_s * fps + 1e-6)
        if not found or found[-1] != i:
            found.append(i)
        j += 1
    return found


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Four real videos of panned photographs, four codecs/containers, 64x48 to 112x84, 15-30 fps.

    Listed in the order a walk of their folder gives."""
    root = tmp_path_factory.mktemp("clips")
    return [
        write_scene_video(root / "a_china.mp4", 40, "mp4v", (96, 72), 25, "china.jpg"),
        write_scene_video(root / "b_flower.avi", 31, "MJPG", (80, 60), 15, "flower.jpg"),
        write_scene_video(root / "c_china.mkv", 24, "XVID", (64, 48), 30, "china.jpg"),
        write_scene_video(root / "d_flower.webm", 20, "VP80", (112, 84), 20, "flower.jpg"),
    ]


_DECODED: dict[Path, list[np.ndarray]] = {}


def reference(tmp_path: Path, weights: Path, wanted: list[tuple[Path, list[int]]], layers: str = "gap",
              ) -> dict[str, list[np.ndarray]]:
    """Each (video, indices): the frames OpenCV decodes reading the video front to back, saved as lossless
    PNGs and run through extract-features as images; {layer: [array per video]} (NaN where a frame
    does not exist in the sequential decode)."""
    from PIL import Image

    folder = tmp_path / "reference_frames"
    folder.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    for v, (video, idx) in enumerate(wanted):
        frames = _DECODED.setdefault(video, decode_all(video))
        for i in sorted(set(idx)):
            if i < len(frames):
                assert read_index(frames[i]) == i  # the sequential decode is itself right
                Image.fromarray(frames[i]).save(folder / f"{v:03d}_{i:06d}.png")
        pngs += [folder / f"{v:03d}_{i:06d}.png" for i in idx if i < len(frames)]
    out = tmp_path / "reference"
    result = invoke(*pngs, "-o", out, "-l", layers, *small(weights, "-b", "8"))
    assert result.exit_code == 0, result.stderr
    found = {}
    for layer in layers.split(","):
        array = load(out, layer)
        rows, missing = iter(array), np.full(array.shape[1:], np.nan, array.dtype)
        found[layer] = [np.stack([next(rows) if i < len(_DECODED[video]) else missing for i in idx])
                        for video, idx in wanted]
    return found


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN rows differ"
    diff = np.nanmax(np.abs(got.astype(np.float64) - want)) if np.isfinite(want).any() else 0.0
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e} > {TOL}"


# --- item 5: the features are those of the frame at that index, decoded by OpenCV ----------------------


def test_segments_equal_opencv_frames_run_as_images(tmp_path, clips, resnet18_weights_pth):
    out = tmp_path / "feats"
    result = invoke(clips[0].parent, "-o", out, "-l", "layer3,gap", "--segments", "4",
                    *small(resnet18_weights_pth, "-b", "3"))  # 3: frames of two videos share a batch
    assert result.exit_code == 0, result.stderr
    assert load(out, "gap").shape == (4, 4, 512) and load(out, "layer3").shape == (4, 4, 256, 4, 4)
    assert not (out / "offsets.npy").exists()

    info = {r["path"]: r for r in video_info(clips[0].parent, "--segments", "4")}
    with open(out / "index.csv", newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == COLUMNS
    rows = index(out)
    assert [r["path"] for r in rows] == [str(c) for c in clips]
    for row in rows:
        want = info[row["path"]]
        assert (row["status"], row["error"]) == ("ok", "")
        assert indices(row) == want["indices"], row["path"]  # exactly video-info's TSN indices
        assert int(row["frame_count"]) == want["frame_count"] and float(row["fps"]) == pytest.approx(want["fps"])
    assert sampling(out)["method"] == "segments" and sampling(out)["segments"] == 4
    assert sampling(out)["mode"] == "test"

    ref = reference(tmp_path, resnet18_weights_pth, [(c, indices(r)) for c, r in zip(clips, rows)], "layer3,gap")
    for layer in ("layer3", "gap"):
        for v, clip in enumerate(clips):
            assert_close(load(out, layer)[v], ref[layer][v], f"{clip.name} {layer}")
    # the check can fail: the next frame's features are far from this one's
    neighbours = reference(tmp_path / "next", resnet18_weights_pth, [(clips[0], [i + 1 for i in indices(rows[0])])])
    assert np.abs(neighbours["gap"][0] - load(out, "gap")[0]).max() > 100 * TOL


def test_fps_equal_opencv_frames_with_offsets(tmp_path, clips, resnet18_weights_pth):
    out = tmp_path / "feats"
    result = invoke(*clips, "-o", out, "-l", "gap", "--fps", "7", *small(resnet18_weights_pth, "-b", "5"))
    assert result.exit_code == 0, result.stderr
    rows = index(out)
    meta = {r["path"]: r for r in video_info(*clips)}
    wanted = []
    for clip, row in zip(clips, rows):
        fc, fps = meta[str(clip)]["frame_count"], meta[str(clip)]["fps"]
        assert indices(row) == fps_indices(fc, fps, 7.0), clip.name
        wanted.append((clip, indices(row)))
    offsets = np.load(out / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == np.cumsum([0] + [len(i) for _, i in wanted]).tolist()
    gap = load(out, "gap")
    assert gap.shape == (offsets[-1], 512)
    assert sampling(out)["method"] == "fps" and sampling(out)["fps"] == 7

    ref = reference(tmp_path, resnet18_weights_pth, wanted)["gap"]
    for v, clip in enumerate(clips):
        assert_close(gap[offsets[v]:offsets[v + 1]], ref[v], clip.name)


def test_every_max_frames_and_a_rate_above_the_videos(tmp_path, clips, resnet18_weights_pth):
    a, b = clips[0], clips[1]  # 40 frames at 25 fps, 31 at 15
    runs = {}
    for name, opts in {"all": ["--fps", "100"], "every": ["--every", "7"], "capped": ["--every", "5",
                                                                                      "--max-frames", "3"]}.items():
        out = tmp_path / name
        result = invoke(a, b, "-o", out, "-l", "gap", *opts, *small(resnet18_weights_pth, "-b", "16"))
        assert result.exit_code == 0, result.stderr
        runs[name] = out
    assert [indices(r) for r in index(runs["all"])] == [list(range(40)), list(range(31))]  # each frame once
    assert [indices(r) for r in index(runs["every"])] == [list(range(0, 40, 7)), list(range(0, 31, 7))]
    assert [indices(r) for r in index(runs["capped"])] == [[0, 5, 10], [0, 5, 10]]
    assert np.load(runs["capped"] / "offsets.npy").tolist() == [0, 3, 6]
    assert sampling(runs["capped"])["method"] == "every" and sampling(runs["capped"])["every"] == 5
    assert sampling(runs["capped"])["max_frames"] == 3
    # the same frame gives the same features whichever option sampled it
    every_frame = load(runs["all"], "gap")
    for name in ("every", "capped"):
        offsets = np.load(runs[name] / "offsets.npy")
        for v, row in enumerate(index(runs[name])):
            want = every_frame[[[0, 40][v] + i for i in indices(row)]]
            assert_close(load(runs[name], "gap")[offsets[v]:offsets[v + 1]], want, f"{name} {row['path']}")


def test_a_three_frame_video_repeats_video_infos_indices(tmp_path, resnet18_weights_pth):
    clip = write_scene_video(tmp_path / "three.mp4", 3, "mp4v", (64, 48))
    out = tmp_path / "feats"
    result = invoke(clip, "-o", out, "-l", "gap", "--segments", "8", *small(resnet18_weights_pth))
    assert result.exit_code == 0, result.stderr
    want = video_info(clip, "--segments", "8")[0]["indices"]
    assert indices(index(out)[0]) == want == [0, 0, 0, 1, 1, 2, 2, 2]
    gap = load(out, "gap")
    assert gap.shape == (1, 8, 512)
    assert_close(gap[0], reference(tmp_path, resnet18_weights_pth, [(clip, want)])["gap"][0], "three.mp4")


def test_train_mode_takes_video_infos_seeded_indices(tmp_path, clips, resnet18_weights_pth):
    picked = {}
    for seed in ("3", "4"):
        out = tmp_path / seed
        result = invoke(*clips, "-o", out, "-l", "gap", "--segments", "5", "--mode", "train", "--seed", seed,
                        *small(resnet18_weights_pth, "-b", "8"))
        assert result.exit_code == 0, result.stderr
        picked[seed] = [indices(r) for r in index(out)]
        info = video_info(*clips, "--segments", "5", "--mode", "train", "--seed", seed)
        assert picked[seed] == [r["indices"] for r in info]
        assert sampling(out)["mode"] == "train" and sampling(out)["seed"] == int(seed)
    assert picked["3"] != picked["4"]


def test_pool_frames_reduce_each_video_to_one_row(tmp_path, clips, resnet18_weights_pth):
    runs = {}
    for pool in ("none", "mean", "max"):
        out = tmp_path / pool
        result = invoke(*clips[:3], "-o", out, "-l", "layer3,gap", "--every", "4", "--pool-frames", pool,
                        *small(resnet18_weights_pth, "-b", "8"))
        assert result.exit_code == 0, result.stderr
        runs[pool] = out
    offsets = np.load(runs["none"] / "offsets.npy")
    for pool, reduce in (("mean", np.mean), ("max", np.max)):
        assert not (runs[pool] / "offsets.npy").exists()
        assert sampling(runs[pool])["pool_frames"] == pool
        for layer in ("layer3", "gap"):
            frames = load(runs["none"], layer)
            want = np.stack([reduce(frames[offsets[v]:offsets[v + 1]].astype(np.float64), axis=0) for v in range(3)])
            assert_close(load(runs[pool], layer), want, f"{pool} {layer}")
            assert load(runs[pool], layer).shape == (3, *frames.shape[1:])


# --- videos that stop decoding, and files that are not videos --------------------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    cut = truncate(write_scene_video(root / "b_cut.avi", 40, "MJPG", (80, 60), 25, "flower.jpg"))
    (root / "c_text.mp4").write_text("not a video\n" * 50)
    return {"good": write_scene_video(root / "a_good.mp4", 30, "mp4v", (64, 48)), "cut": cut,
            "text": root / "c_text.mp4"}


def test_a_video_cut_short_has_nan_rows_partial_status_and_exit_3(tmp_path, broken, resnet18_weights_pth,
                                                                   run_torchtool):
    decodable = len(decode_all(broken["cut"]))
    assert 5 <= decodable < 40
    out = tmp_path / "feats"
    proc = run_torchtool("extract-features", str(broken["cut"].parent), "-o", str(out), "-l", "gap", "--segments", "8",
                         "-m", "resnet18", "-w", str(resnet18_weights_pth), *SIZE, "-b", "4", "--workers", "2",
                         "--device", "cpu")  # loader workers, end to end
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    good, cut, text = index(out)
    assert (good["status"], good["error"]) == ("ok", "")
    want = video_info(broken["cut"], "--segments", "8")[0]["indices"]
    assert indices(cut) == want and cut["status"] == "partial" and cut["error"] != ""
    assert any(i >= decodable for i in want) and any(i < decodable for i in want)
    assert text["status"] == "skipped" and text["error"] != ""
    gap = load(out, "gap")
    assert gap.shape == (3, 8, 512)
    assert np.isnan(gap[2]).all() and np.isfinite(gap[0]).all()
    ref = reference(tmp_path, resnet18_weights_pth, [(broken["cut"], want)])["gap"][0]
    assert_close(gap[1], ref, "the frames that decode, and NaN for those that do not")

    pooled = tmp_path / "pooled"
    result = invoke(broken["cut"], broken["text"], "-o", pooled, "-l", "gap", "--segments", "8", "--pool-frames",
                    "mean", *small(resnet18_weights_pth))
    assert result.exit_code == EXIT_PARTIAL, result.stderr
    mean = load(pooled, "gap")
    assert mean.shape == (2, 512) and np.isnan(mean[1]).all()
    assert_close(mean[0], np.nanmean(ref.astype(np.float64), axis=0), "the mean over the frames that decoded")


def test_strict_fails_on_the_first_bad_video_or_frame(tmp_path, broken, resnet18_weights_pth):
    unreadable = invoke(broken["good"], broken["text"], "-o", tmp_path / "a", "-l", "gap", "--segments", "4", "--strict",
                        *small(resnet18_weights_pth))
    assert unreadable.exit_code == EXIT_FAILURE, unreadable.stderr
    assert unreadable.stderr.startswith(f"torchtool: error: cannot read {broken['text']}: ")
    assert not (tmp_path / "a").exists()  # refused before the output was made
    cut = invoke(broken["cut"], "-o", tmp_path / "b", "-l", "gap", "--segments", "8", "--strict",
                 *small(resnet18_weights_pth))
    assert cut.exit_code == EXIT_FAILURE and "does not decode" in cut.stderr.splitlines()[0], cut.stderr


# --- options and inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [
    ["IMAGE"], ["--segments", "4", "--fps", "2"], ["--fps", "2", "--every", "3"], ["--segments", "4", "--every", "3"],
    ["--segments", "4", "--max-frames", "3"],
], ids=["images-and-videos", "segments-fps", "fps-every", "segments-every", "max-frames-segments"])
def test_conflicting_inputs_and_sampling_options_are_usage_errors(tmp_path, clips, photo_files,
                                                                  resnet18_weights_pth, opts):
    out = tmp_path / "feats"
    opts = [str(photo_files[0]) if o == "IMAGE" else o for o in opts]
    result = invoke(clips[0], *opts, "-o", out, *small(resnet18_weights_pth))
    assert result.exit_code == EXIT_USAGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("torchtool: error: ") and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("opts", [["--segments", "4"], ["--fps", "2"], ["--every", "3"], ["--max-frames", "3"],
                                  ["--pool-frames", "mean"], ["--mode", "train"], ["--mode", "test"]],
                         ids=lambda o: "-".join(o).lstrip("-"))  # given, even at its default value: refused
def test_video_options_with_images_are_usage_errors(tmp_path, photo_files, resnet18_weights_pth, opts):
    out = tmp_path / "feats"
    result = invoke(*photo_files[:2], *opts, "-o", out, *small(resnet18_weights_pth))
    assert result.exit_code == EXIT_USAGE, result.stderr
    assert result.stderr.startswith("torchtool: error: ") and opts[0] in result.stderr
    assert not out.exists()


def test_videos_default_to_8_test_segments_with_a_note(tmp_path, clips, resnet18_weights_pth):
    out = tmp_path / "feats"
    result = invoke(clips[2], "-o", out, "-l", "gap", *small(resnet18_weights_pth, "-b", "8"))
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "--segments" in line and "8" in line]
    assert len(notes) == 1, result.stderr
    assert load(out, "gap").shape == (1, 8, 512)
    assert indices(index(out)[0]) == video_info(clips[2], "--segments", "8")[0]["indices"]
    assert sampling(out)["method"] == "segments" and sampling(out)["segments"] == 8 and sampling(out)["mode"] == "test"


@pytest.mark.parametrize("via", ["stdin", "list"])
def test_stdin_and_list_keep_their_order(tmp_path, clips, resnet18_weights_pth, via):
    order = [3, 0, 2, 1]
    text = "".join(f"{clips[i]}\n" for i in order)
    out = tmp_path / "feats"
    if via == "stdin":
        result = invoke("-", "-o", out, "-l", "gap", "--segments", "2", *small(resnet18_weights_pth), input=text)
    else:
        (tmp_path / "list.txt").write_text(text)
        result = invoke("--list", tmp_path / "list.txt", "-o", out, "-l", "gap", "--segments", "2",
                        *small(resnet18_weights_pth))
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in index(out)] == [str(clips[i]) for i in order]
    walked = tmp_path / "walked"
    assert invoke(clips[0].parent, "-o", walked, "-l", "gap", "--segments", "2",
                  *small(resnet18_weights_pth)).exit_code == 0
    np.testing.assert_allclose(load(out, "gap"), load(walked, "gap")[order], rtol=1e-5, atol=1e-6)


# --- resume and torchrun -----------------------------------------------------------------------------


def _done_rows(out: Path) -> int:
    """How many frames the run's state records as done (0 while it does not exist yet)."""
    try:
        return int((np.load(out / ".state" / "status.npy") != 0).sum())
    except (OSError, ValueError, EOFError):  # not there yet, or caught mid-creation
        return 0


@pytest.mark.parametrize("opts", [["--segments", "8"], ["--every", "6"]], ids=["segments", "every"])
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, clips, resnet18_weights_pth, torchtool_exe, spawn,
                                                 wait_for, opts):
    listing = tmp_path / "list.txt"
    n = 64  # long enough that the kill comes mid-way
    listing.write_text("".join(f"{clips[i % len(clips)]}\n" for i in range(n)))
    out = tmp_path / "feats"
    base = ["--list", str(listing), "-o", str(out), "-l", "layer3,gap", *small(resnet18_weights_pth, "-b", "4"),
            "--device", "cpu"]
    args = [*base, *opts]
    proc = spawn(torchtool_exe, "extract-features", *args)
    wait_for("the first videos' rows written", lambda: _done_rows(out) >= 30, proc)  # > 3 videos' frames
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=GENEROUS_S)
    status = np.load(out / ".state" / "status.npy")
    assert 30 <= int((status != 0).sum()) < len(status), "killed after the end: make the run longer"

    changed = opts[:-1] + [str(int(opts[-1]) + 1)]
    for other in (changed, ["--fps", "3"], [*opts, "--pool-frames", "mean"]):
        refused = invoke(*base, *other)
        assert refused.exit_code == EXIT_USAGE, (other, refused.stderr)
        assert "unfinished extraction with different settings" in refused.stderr
        assert (np.load(out / ".state" / "status.npy") == status).all()

    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.stderr
    done = re.search(rf"resuming {re.escape(str(out))}: (\d+) of {n} videos already done", resumed.stderr)
    assert done and 1 <= int(done[1]) < n, resumed.stderr
    fresh = tmp_path / "uninterrupted"
    result = invoke(*[str(fresh) if a == str(out) else a for a in args])
    assert result.exit_code == 0, result.stderr
    names = ["layer3.npy", "gap.npy", "index.csv"] + (["offsets.npy"] if "--every" in opts else [])
    for name in names:
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    assert not (out / ".state").exists()

    if "--every" in opts:  # --overwrite: a new run with the other settings (one variant is enough)
        again = invoke(*base, *changed, "--overwrite")
        assert again.exit_code == 0, again.stderr
        assert "resuming" not in again.stderr and sampling(out)["every"] == int(changed[-1])


# a bad frame's NaN row was once K frames long, so one process's NaN could land on the next video's first frame
# after the other process had written it (seen under load only): tests/core/test_video_features.py has it exactly
@pytest.mark.parametrize("opts", [["--segments", "3"], ["--fps", "4"]], ids=["segments", "fps"])
def test_torchrun_two_processes_write_the_same_bytes_as_one(tmp_path, clips, broken, run_python, opts):
    inputs = [str(c) for c in [*clips, broken["cut"], broken["text"], clips[2]]]  # odd: ranks get unequal shares
    args = [*inputs, "-l", "layer3,gap", *opts, *small("none", "-b", "3"), "--seed", "5", "--device", "cpu"]
    two = tmp_path / "two"
    proc = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torchtool",
                      "extract-features", *args, "-o", str(two), env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    # each rank exits 3 (partial); torchrun itself turns any non-zero exit of its workers into 1
    assert proc.returncode == 1 and proc.stderr.count("exitcode  : 3") == 2, proc.stderr[-3000:]
    # the one process as each rank runs: a fresh process with one thread (an in-process run would inherit this
    # test worker's threads and whatever global torch state earlier tests left, which can change the last bits)
    one = tmp_path / "one"
    single = run_python("-m", "torchtool", "extract-features", *args, "-o", str(one), env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == EXIT_PARTIAL, single.stderr[-3000:]
    names = ["layer3.npy", "gap.npy", "index.csv"] + (["offsets.npy"] if "--fps" in opts else [])
    for name in names:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert [r["status"] for r in index(two)] == ["ok"] * 4 + ["partial", "skipped", "ok"]
    assert np.isfinite(load(two, "gap")[[0, 1, 2, 3, 6]]).all()  # (load: and nothing past the array's end)
    assert not (two / ".state").exists()
