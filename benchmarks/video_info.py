"""`torchtool video-info DIR` against a loop of ffprobe calls, on real videos, in one run.

    python benchmarks/video_info.py [--videos 120] [--rounds 3] [--goal 10]

(~1 minute on 2 cores.) Writes ``--videos`` small real videos with OpenCV (half MP4/mp4v,
half AVI/MJPG, 64x48 to 96x72, 20-90 frames), then, every round (the order alternating):

    torchtool video-info DIR --json                   one process for the whole folder
    for f in DIR/*: ffprobe -show_entries stream=...  one process per file (what scripts do)

Both are whole processes timed from here; the ratio is ffprobe-loop time / torchtool time
(goal >= 10). The metadata must agree on every video (size, fps, container frame count,
codec name), and ``--exact`` counts with ``ffprobe -count_frames`` (which decodes every
frame too). Each goal prints "met" or "NOT met"; the exit status is 1 when any is not met,
2 when nothing could be measured (no ffprobe: Debian/Ubuntu ``apt install ffmpeg``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from _timing import machine, torchtool_exe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 10.0
FIELDS = "stream=width,height,r_frame_rate,nb_frames,codec_name"
AGREE = 1.0  # the share of videos whose metadata and exact counts must equal ffprobe's


def make_videos(root: Path, n: int, seed: int = 0) -> list[Path]:
    from tests.video_data import write_video

    rng = random.Random(seed)
    paths = []
    for i in range(n):
        mp4 = i % 2 == 0
        size = rng.choice([(64, 48), (80, 60), (96, 72)])
        path = root / f"clip_{i:04d}.{'mp4' if mp4 else 'avi'}"
        write_video(path, rng.randint(20, 90), "mp4v" if mp4 else "MJPG", size=size, fps=rng.choice([24, 25, 30]))
        paths.append(path)
    return paths


def ffprobe(path: Path, count: bool = False) -> dict:
    fields = "stream=nb_read_frames" if count else FIELDS
    cmd = ["ffprobe", "-v", "error", "-select_streams", "v:0", *(["-count_frames"] if count else []),
           "-show_entries", fields, "-of", "json", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["streams"][0]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--goal", type=float, default=GOAL, help="the speed-up over the ffprobe loop to reach")
    args = ap.parse_args()
    if shutil.which("ffprobe") is None:
        print("ffprobe not found: install FFmpeg (Debian/Ubuntu: apt install ffmpeg) to run this benchmark")
        return 2
    exe = torchtool_exe()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        paths = make_videos(folder, args.videos)

        def ours() -> list[dict]:
            proc = subprocess.run([exe, "video-info", str(folder), "--json"], capture_output=True, text=True,
                                  check=True)
            return json.loads(proc.stdout)

        def theirs() -> list[dict]:
            return [ffprobe(p) for p in paths]

        ours(), theirs()  # warm-up: file caches
        t_ours, t_theirs = [], []
        for r in range(args.rounds):
            order = [(ours, t_ours), (theirs, t_theirs)]
            for fn, out in (order if r % 2 == 0 else order[::-1]):
                seconds, result = timed(fn)
                out.append(seconds)
        rows, probes = ours(), theirs()
        agree = sum(r["width"] == int(p["width"]) and r["height"] == int(p["height"])
                    and abs(r["fps"] - float(Fraction(p["r_frame_rate"]))) < 1e-3
                    and (p.get("nb_frames") in (None, "N/A") or r["frame_count"] == int(p["nb_frames"]))
                    and r["codec"] == p["codec_name"]
                    for r, p in zip(rows, probes))
        t_exact, exact = timed(lambda: json.loads(subprocess.run(
            [exe, "video-info", str(folder), "--exact", "--json"], capture_output=True, text=True, check=True).stdout))
        t_count, counted = timed(lambda: [int(ffprobe(p, count=True)["nb_read_frames"]) for p in paths])
        same = sum(r["exact_frame_count"] == c for r, c in zip(exact, counted))

    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    ratio = med_theirs / med_ours
    print(f"video-info benchmark on {machine()}; {args.videos} videos, {args.rounds} rounds, medians")
    print(f"  torchtool video-info DIR       {med_ours:7.2f} s  ({med_ours / args.videos * 1e3:6.1f} ms/video, "
          "start-up included)")
    print(f"  ffprobe loop (one per file)    {med_theirs:7.2f} s  ({med_theirs / args.videos * 1e3:6.1f} ms/video)")
    goals = {"speed": ratio >= args.goal, "metadata": agree >= AGREE * args.videos,
             "exact": same >= AGREE * args.videos}
    print(f"  ratio ffprobe/torchtool = {ratio:.1f}x (goal >= {args.goal:g}x: {verdict(goals['speed'])})")
    print(f"  metadata (size, fps, frame count, codec) agrees with ffprobe on {agree}/{args.videos} videos "
          f"(goal {AGREE:.0%}: {verdict(goals['metadata'])})")
    print(f"  --exact: {same}/{args.videos} counts equal ffprobe -count_frames (goal {AGREE:.0%}: "
          f"{verdict(goals['exact'])}; torchtool {t_exact:.2f} s, ffprobe {t_count:.2f} s)")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
