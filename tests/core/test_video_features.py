"""Videos as extract-features inputs, the pieces: sampling, rows, pooling, the per-video status."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from torchtool.core.features.store import OK, PENDING, SKIPPED, FeatureStore, RowFile
from torchtool.core.features.videos import (FramePool, Layout, PlannedVideo, Sampling, sampling_from, video_index,
                                            video_status)
from torchtool.core.output import UsageError
from torchtool.core.video.tsn import every_indices, rate_indices, tsn_indices, video_rng


def _by_hand(n: int, video_fps: float, fps: float) -> list[int]:
    """Frames at fps per second of the timeline: the frame showing at each t = j / fps before the end."""
    found, j = [], 0
    while j / fps < n / video_fps - 1e-9:
        found.append(min(n - 1, math.floor(j / fps * video_fps + 1e-6)))
        j += 1
    return sorted(set(found))


@pytest.mark.parametrize(("n", "video_fps", "fps"), [(100, 25, 1), (100, 25, 3), (31, 30, 2), (30, 30, 2),
                                                       (10, 25, 50), (250, 29.97, 4), (1, 25, 1), (7, 24, 24)])
def test_rate_indices_are_the_frames_showing_at_each_tick(n, video_fps, fps):
    got = rate_indices(n, video_fps, fps)
    assert got == _by_hand(n, video_fps, fps)
    assert got[0] == 0 and all(0 <= i < n for i in got) and got == sorted(set(got))


def test_rate_indices_spell_out_simple_cases():
    assert rate_indices(100, 25, 1) == [0, 25, 50, 75]
    assert rate_indices(10, 25, 50) == list(range(10))  # above the video's rate: every frame, once
    assert every_indices(10, 3) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="no frame rate"):
        rate_indices(10, 0, 1)


def test_segments_are_video_infos_indices():
    sampling = Sampling("segments", 8, "train", 7)
    path = Path("videos/a.mp4")
    assert sampling.indices(path, 100, 25.0) == tsn_indices(100, 8, "train", video_rng(7, path))
    assert Sampling().indices(path, 3, 25.0) == tsn_indices(3, 8, "test") == [0, 0, 0, 1, 1, 2, 2, 2]
    assert Sampling("every", None, every=10, max_frames=3).indices(path, 100, 25.0) == [0, 10, 20]


@pytest.mark.parametrize(("args", "message"), [
    ((8, 2.0, None, "test", 0, None, "none"), "not --segments and --fps"),
    ((None, 1.0, 5, "test", 0, None, "none"), "not --fps and --every"),
    ((8, None, None, "test", 0, 4, "none"), "--max-frames applies to --fps and --every"),
    ((None, 1.0, None, "train", 0, None, "none"), "--mode applies to --segments"),
    ((None, 0.0, None, "test", 0, None, "none"), "--fps must be above 0"),
    ((None, None, None, "test", 0, None, "sum"), "unknown --pool-frames"),
])
def test_contradictory_sampling_is_refused(args, message):
    with pytest.raises(UsageError, match=message):
        sampling_from(*args)


def test_the_default_is_eight_segments():
    sampling, default = sampling_from(None, None, None, "test", 3, None, "mean")
    assert default and sampling.method == "segments" and sampling.segments == 8 and sampling.pool_frames == "mean"
    assert sampling_from(4, None, None, "test", 0, None, "none")[1] is False


def _plan(counts, error_at=()):
    return [PlannedVideo(Path(f"v{i}.avi"), n, 25.0, True, tuple(range(n)), "broken" if i in error_at else None)
            for i, n in enumerate(counts)]


def test_layout_rows_for_each_sampling():
    plan = _plan([3, 0, 5])
    varying = Layout(plan, Sampling("every", None, every=1))
    assert varying.offsets.tolist() == [0, 3, 3, 8] and varying.rows == 8 and varying.group == 1
    assert varying.video_of(np.arange(8)).tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    fixed = Layout(plan, Sampling("segments", 4))
    assert fixed.offsets.tolist() == [0, 4, 8, 12] and fixed.rows == 12 and fixed.group == 4
    pooled = Layout(plan, Sampling("segments", 4, pool_frames="max"))
    assert pooled.rows == 3 and pooled.group == 1 and list(pooled.rows_of(2)) == [2] and list(pooled.frames(2)) == [8, 9, 10, 11]


def test_pending_videos_are_those_with_a_row_left():
    layout = Layout(_plan([2, 0, 3]), Sampling("every", None, every=1))
    status = np.array([OK, OK, OK, PENDING, SKIPPED], dtype=np.uint8)
    assert layout.pending(status) == [2]  # the 0-row video is never pending
    assert layout.pending(np.full(5, OK, np.uint8)) == []


def test_a_pooled_row_does_not_depend_on_the_order_frames_arrive_in():
    layout = Layout(_plan([6, 6]), Sampling("segments", 6, pool_frames="mean"))
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, 33)).astype(np.float32) * 1e3  # float sums that depend on their order
    results = []
    for seed in range(5):
        order = list(range(12))
        random.Random(seed).shuffle(order)
        pool, got = FramePool(layout, "mean", normalize=False), {}
        for chunk in np.array_split(np.array(order), 4):
            rows, pooled, bad, notes = pool.add(chunk, {"gap": feats[chunk]}, {})
            assert not bad and not notes
            got |= {int(r): pooled["gap"][i].tobytes() for i, r in enumerate(rows)}
        results.append(got)
    assert all(r == results[0] for r in results) and sorted(results[0]) == [0, 1]
    np.testing.assert_allclose(np.frombuffer(results[0][1], np.float32), feats[6:].mean(0), rtol=1e-5)


def test_a_pooled_video_pools_the_frames_that_decoded_and_says_what_is_missing():
    layout = Layout(_plan([4, 2]), Sampling("every", None, every=1, pool_frames="max"))
    feats = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    pool = FramePool(layout, "max", normalize=False)
    rows, pooled, bad, notes = pool.add(np.array([0, 1]), {"gap": feats[[0, 1]]}, {2: "frame 2 does not decode",
                                                                                    3: "frame 2 does not decode"})
    assert rows.tolist() == [0] and pooled["gap"].tolist() == [[2.0, 3.0]]
    assert notes == {0: "frame 2 does not decode (2 of 4 frames missing)"} and not bad
    rows, pooled, bad, notes = pool.add(np.array([], dtype=np.int64), {}, {4: "gone", 5: "gone"})
    assert rows.tolist() == [] and bad == {1: "gone"}


def test_video_status_and_index():
    plan = _plan([2, 2, 2]) + [PlannedVideo(Path("bad.mp4"), None, None, False, (), "not a readable video")]
    layout = Layout(plan, Sampling("every", None, every=1))
    status = np.array([OK, OK, OK, SKIPPED, SKIPPED, SKIPPED], dtype=np.uint8)
    states = video_status(layout, status, {3: "frame 1 does not decode", 4: "cannot open", 5: "cannot open"})
    assert states == [("ok", ""), ("partial", "frame 1 does not decode (1 of 2 frames missing)"),
                      ("skipped", "cannot open"), ("skipped", "not a readable video")]
    lines = video_index(layout, states).splitlines()
    assert lines[0] == "path,status,frame_count,fps,indices,error"
    assert lines[1] == "v0.avi,ok,2,25,0 1," and lines[4] == "bad.mp4,skipped,,,,not a readable video"


@pytest.mark.parametrize("order", ["neighbour first", "bad rows first"])
def test_bad_frame_rows_of_a_video_array_touch_no_other_row(tmp_path, order):
    """[videos, K, D] files: a bad frame's NaN row is one frame's, in whatever order the processes write (it
    was K frames' long: under torchrun the next video's first frame could be NaN, and the file grew)."""
    store = FeatureStore(tmp_path, 9, {"gap": (4,), "map": (2, 2)}, "float32", create=True, group=3)
    good = {"gap": np.ones((3, 4), np.float32), "map": np.ones((3, 2, 2), np.float32)}
    writes = [(np.array([3, 4, 5]), good, {}), (np.empty(0, np.int64), {}, {1: "gone", 2: "gone"})]
    for rows, feats, bad in writes if order == "neighbour first" else writes[::-1]:
        store.write(rows, feats, bad)
    store.close()
    for name, shape in (("gap", (4,)), ("map", (2, 2))):
        array = np.load(tmp_path / f"{name}.npy")
        assert array.shape == (3, 3, *shape)
        assert (tmp_path / f"{name}.npy").stat().st_size == np.load(tmp_path / f"{name}.npy", mmap_mode="r").offset \
            + array.nbytes  # nothing written past the end
        assert np.isnan(array[0, 1:]).all() and (array[0, 0] == 0).all()  # row 0 never written: zeros
        assert (array[1] == 1).all() and (array[2] == 0).all()


def test_a_row_file_refuses_a_write_that_is_not_its_rows(tmp_path):
    rows = RowFile(tmp_path / "a.npy", (2, 3, 4), np.float32, create=True, row_dims=2)
    for at, values in (([0, 1], np.zeros((2, 3, 4))), ([0], np.zeros((1, 3, 4))), ([6], np.zeros((1, 4))),
                       ([-1], np.zeros((1, 4))), ([4, 5], np.zeros((1, 4)))):
        with pytest.raises(ValueError, match="cannot write"):
            rows.write(np.array(at), values)
    rows.write(np.array([5]), np.ones((1, 4)))
    rows.close()
    assert np.load(tmp_path / "a.npy")[1, 2].tolist() == [1.0] * 4
