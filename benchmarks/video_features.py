"""extract-features on videos (--segments 8, resnet18 gap) against its forward pass and a hand-written loop.

    python benchmarks/video_features.py [--videos-dir DIR] [--videos 40] [--rounds 3] [--quick]
                                        [--batch-size 16] [--workers N] [--device cpu]

(~10 minutes on 2 cores the first time, ~4 of them writing the videos: pass --videos-dir to keep
them and skip that on reruns. --quick: the first 8 videos, 1 round, well under 2 minutes once
the videos exist.)

The videos are real files OpenCV writes: a slow pan and zoom over scikit-learn's china.jpg and
flower.jpg (texture and motion, so the codecs work as on footage), 5-30 s at 24/25/30 fps,
320x240 to 1280x720, mp4v in .mp4, XVID in .avi and .mkv, MJPG in .avi (<= 640x480) and VP8 in
.webm (<= 640x360; libvpx writes 720p at ~9 frames/s). Each video gets 8 TSN test-mode frames.

(whole) the `torchtool extract-features DIR --segments 8 -l gap` process, start-up included:
        frames/s = 8 x videos / its wall time;
(a)     forward only: the sampled frames decoded beforehand as uint8 crops (the weights' preset),
        then normalised and run through the module the command runs (torchtool's
        FeatureExtractor, BatchNorm folded) in batches of --batch-size: the limit;
(b)     the hand-written loop: per video cv2.VideoCapture, per sampled frame a seek
        (CAP_PROP_POS_FRAMES) and read, torchvision's Resize/CenterCrop/ToTensor/Normalize on
        the PIL image, then torchvision's resnet18 on the batch of that video's 8 frames.
Every round measures (a), (b) and (whole), in an order that alternates, and takes the ratios
within the round (this VM's speed drifts); the figures are medians over --rounds. Goals:
whole/(b) >= 1.5 and whole/(a) >= 0.8. The decode share is the hand loop's seek+read time over
its total; torchtool's own loader-wait line (stderr) is printed when it shows one. Exit 1 when
a goal is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from _timing import machine, torchtool_exe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEGMENTS = 8
SIZES = [(320, 240), (640, 360), (640, 480), (960, 540), (1280, 720)]
# (suffix, fourcc, largest width it is used for)
CODECS = [(".mp4", "mp4v", 1280), (".avi", "XVID", 1280), (".mkv", "XVID", 1280), (".avi", "MJPG", 640),
          (".webm", "VP80", 640)]
GOAL_HAND, GOAL_FORWARD = 1.5, 0.8


def plan(n: int) -> list[dict]:
    """The i-th video's name and settings: the same for any ``n``, so a larger set extends a smaller one."""
    videos = []
    for i in range(n):
        rng = random.Random(i)
        size = SIZES[i % len(SIZES)]
        suffix, fourcc, _ = [c for c in CODECS if c[2] >= size[0]][i // len(SIZES) % sum(c[2] >= size[0] for c in CODECS)]
        fps = rng.choice([24, 25, 30])
        seconds = rng.randint(5, 30) if size[1] < 540 or fourcc != "mp4v" else rng.randint(5, 15)
        if fourcc == "VP80":
            seconds = min(seconds, 12)
        videos.append({"name": f"v{i:03d}_{size[0]}x{size[1]}_{fourcc}{suffix}", "fourcc": fourcc, "size": list(size),
                       "fps": fps, "frames": seconds * fps, "photo": ["china.jpg", "flower.jpg"][i % 2]})
    return videos


def make_videos(folder: Path, n: int) -> list[Path]:
    """The first ``n`` planned videos in ``folder``, written where missing (a temporary name, then renamed:
    an interrupted run leaves no half-written video to be taken for a cached one)."""
    from tests.video_data import write_scene_video

    folder.mkdir(parents=True, exist_ok=True)
    paths, started = [], time.perf_counter()
    for spec in plan(n):
        path = folder / spec["name"]
        if not path.exists():
            part = folder / f".part{path.suffix}"
            write_scene_video(part, spec["frames"], spec["fourcc"], tuple(spec["size"]), spec["fps"], spec["photo"],
                              stamp=False)
            part.replace(path)
            print(f"  wrote {path.name} ({spec['frames']} frames, {time.perf_counter() - started:.0f} s so far)",
                  file=sys.stderr)
        paths.append(path)
    return paths


def tsn(path: Path) -> list[int]:
    """The video's 8 test-mode TSN indices from its container's frame count (what the command samples)."""
    import cv2

    from torchtool.core.video.tsn import tsn_indices

    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return tsn_indices(n, SEGMENTS, "test")


def seek_read(cap, index: int):
    """One frame by seeking (the hand loop's decode), RGB."""
    import cv2

    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, frame = cap.read()
    if not ok:
        raise SystemExit(f"cannot read frame {index}")
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class ForwardOnly:
    """(a): pre-decoded uint8 crops of every sampled frame; ``measure()`` normalises and runs them, frames/s."""

    def __init__(self, videos: list[Path], batch_size: int, device: str):
        import cv2
        import torch
        from PIL import Image

        from torchtool.core.data.transforms import CenterCrop, Normalize
        from torchtool.core.features import FeatureExtractor
        from torchtool.core.models import build_model

        built = build_model("resnet18", "none")
        pre = built.preprocess
        crop = CenterCrop(pre.crop_size, pre.resize_size, pre.interpolation)
        frames = []
        for path in videos:
            cap = cv2.VideoCapture(str(path))
            frames += [crop(Image.fromarray(seek_read(cap, i))) for i in tsn(path)]
            cap.release()
        self.batches = [b.contiguous() for b in torch.stack(frames).split(batch_size)]
        self.normalize = Normalize(pre.mean, pre.std, device)
        self.model = FeatureExtractor(built.model, ["gap"], arch="resnet18", fold_bn=True).to(
            device, memory_format=torch.channels_last).eval()
        self.n, self.device = len(frames), device

    def measure(self) -> float:
        import torch

        with torch.inference_mode():
            self.model(self.normalize(self.batches[0]))  # warm-up: oneDNN picks its kernels on the first call
            _sync(self.device)
            start, done = time.perf_counter(), 0
            while done == 0 or time.perf_counter() - start < 4.0:  # a few seconds at least: noise evens out
                for batch in self.batches:
                    self.model(self.normalize(batch))
                _sync(self.device)
                done += self.n
        return done / (time.perf_counter() - start)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class HandLoop:
    """(b): the loop a user writes; ``measure()`` gives frames/s and the share of the time spent decoding."""

    def __init__(self, videos: list[Path], device: str):
        import torchvision
        from torchvision import transforms

        self.videos, self.device = videos, device
        self.model = torchvision.models.resnet18().eval().to(device)
        self.transform = transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def measure(self) -> tuple[float, float]:
        import cv2
        import torch
        from PIL import Image

        decode_s, frames = 0.0, 0
        with torch.no_grad():
            self.model(torch.zeros(1, 3, 224, 224, device=self.device))
            start = time.perf_counter()
            for path in self.videos:
                t0 = time.perf_counter()
                cap = cv2.VideoCapture(str(path))
                n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
                images = [seek_read(cap, i) for i in _tsn_of(n)]
                cap.release()
                decode_s += time.perf_counter() - t0
                batch = torch.stack([self.transform(Image.fromarray(im)) for im in images]).to(self.device)
                self.model(batch).cpu()
                frames += len(images)
            total = time.perf_counter() - start
        return frames / total, decode_s / total


def _tsn_of(n: int) -> list[int]:
    tick = n / SEGMENTS  # TSN test mode, written out as a user would
    return [min(n - 1, int(tick / 2 + tick * k)) for k in range(SEGMENTS)]


def run_whole(folder: Path, out: Path, n_videos: int, extra: list[str]) -> tuple[float, dict, str]:
    """Wall seconds, JSON summary and stderr of one `torchtool extract-features --segments 8` process."""
    import numpy as np

    argv = [torchtool_exe(), "extract-features", str(folder), "--model", "resnet18", "--weights", "none", "--layer",
            "gap", "--segments", str(SEGMENTS), "--out", str(out), "--json", "--overwrite", *extra]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"torchtool failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    gap = np.load(out / "gap.npy")
    if gap.shape != (n_videos, SEGMENTS, 512) or not np.isfinite(gap).all():  # a fast wrong run proves nothing
        raise SystemExit(f"torchtool's gap.npy is {gap.shape}, finite: {np.isfinite(gap).all()}")
    return seconds, json.loads(proc.stdout), proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos-dir", type=Path, help="where the videos are kept between runs (default: a temporary folder)")
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="each figure is the median of this many rounds")
    ap.add_argument("--quick", action="store_true", help="the first 8 videos, 1 round")
    ap.add_argument("--batch-size", type=int, default=16, help="of the command and of (a) (torchtool's CPU default)")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.quick:
        args.videos, args.rounds = 8, 1

    import torch

    kept = nullcontext(str(args.videos_dir)) if args.videos_dir else tempfile.TemporaryDirectory()
    with kept as where, tempfile.TemporaryDirectory() as tmp:
        videos = make_videos(Path(where), args.videos)
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for v in videos:  # exactly these videos, whatever else the cache holds
            os.link(v, folder / v.name)
        frames = SEGMENTS * len(videos)
        specs = plan(len(videos))
        print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, device "
              f"{args.device}, batch {args.batch_size}, workers {args.workers}, {args.rounds} round(s)")
        print(f"videos: {len(videos)} ({sum(s['frames'] for s in specs)} frames, "
              f"{sum(s['frames'] / s['fps'] for s in specs):.0f} s of footage, "
              f"{sum(v.stat().st_size for v in videos) / 1e6:.0f} MB; "
              + ", ".join(f"{k} x{sum(s['fourcc'] + Path(s['name']).suffix == k for s in specs)}"
                          for k in sorted({s["fourcc"] + Path(s["name"]).suffix for s in specs}))
              + f"), {SEGMENTS} frames each: {frames} frames")

        forward, hand = ForwardOnly(videos, args.batch_size, args.device), HandLoop(videos, args.device)
        extra = ["-b", str(args.batch_size), "-j", str(args.workers), "--device", args.device]
        keys = ("whole", "loop", "a", "b", "decode", "whole/a", "whole/b")
        runs: dict[str, list[float]] = {k: [] for k in keys}
        notes = []
        for r in range(args.rounds):
            order = ["a", "b", "whole"] if r % 2 == 0 else ["whole", "b", "a"]
            got = {}
            for what in order:
                if what == "a":
                    got["a"] = forward.measure()
                elif what == "b":
                    got["b"], got["decode"] = hand.measure()
                else:
                    seconds, summary, err = run_whole(folder, Path(tmp) / "out", len(videos), extra)
                    got["whole"] = frames / seconds
                    got["loop"] = summary.get("frames_per_s", summary.get("images_per_s", float("nan")))
                    notes += [line for line in err.splitlines() if "bottleneck" in line]
            got["whole/a"], got["whole/b"] = got["whole"] / got["a"], got["whole"] / got["b"]
            for k in keys:
                runs[k].append(got[k])
        m = {k: statistics.median(v) for k, v in runs.items()}
        print(f"(whole) torchtool extract-features --segments 8: {m['whole']:7.2f} frames/s "
              f"({len(videos)} videos in {frames / m['whole']:.1f} s, start-up included; {m['loop']:.2f} frames/s "
              "in its loop)")
        print(f"(a)     forward only, pre-decoded uint8 crops:   {m['a']:7.2f} frames/s (normalise + torchtool's "
              "extractor, BatchNorm folded)")
        print(f"(b)     hand loop (seek + PIL transforms + model): {m['b']:5.2f} frames/s "
              f"(decode is {m['decode']:.0%} of its time)")
        ok_b, ok_a = m["whole/b"] >= GOAL_HAND, m["whole/a"] >= GOAL_FORWARD
        print(f"ratio whole/(b) = {m['whole/b']:.2f}   (goal >= {GOAL_HAND}, {'met' if ok_b else 'NOT met'})")
        print(f"ratio whole/(a) = {m['whole/a']:.2f}   (goal >= {GOAL_FORWARD}, {'met' if ok_a else 'NOT met'})")
        print(f"decode share: {m['decode']:.0%} of the hand loop's time is cv2 seek + read")
        print("torchtool's loader line: " + (notes[-1] if notes else "none (loading was not the bottleneck)"))
        print("per round: " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in runs.items()))
    if not (ok_a and ok_b):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
