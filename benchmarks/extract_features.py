"""extract-features throughput and memory, against its limit and the naive recipe, in one run.

    python benchmarks/extract_features.py [--images 5000] [--naive-images 150] [--mem-images 2000]
                                          [--rounds 3] [--device cpu|cuda]

(~10 minutes on 2 cores; --images 1000 --rounds 2 for a quick look. The whole process pays a
fixed ~4 s start-up, mostly importing torch and torchvision, so (a)/(b) grows with --images.)

(a) the whole `torchtool extract-features` process (start-up included), resnet18, 224 px, gap;
(b) the same model's forward-only throughput on pre-decoded tensor batches (the limit);
(c) the naive loop of the recipe: PIL open, transform, model(x[None]) one image at a time.
Then the peak RSS of the process for 200 and for --mem-images images (at 64 px, to keep
it quick: memory growth with N is what is measured, not speed).
Inputs are real JPEG photos: random crops of scikit-learn's bundled china.jpg/flower.jpg.
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
from pathlib import Path

import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images

from torchtool.core.data import load_image, preprocess_transform
from torchtool.core.features import FeatureExtractor
from torchtool.core.models import build_model

TORCHTOOL = str(Path(sys.executable).with_name("torchtool"))


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEG crops (120-420 px) of the two bundled photos."""
    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = photos[i % 2]
        w, h = rng.randint(120, 420), rng.randint(120, 420)
        x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        path = folder / f"{i:05d}.jpg"
        img.crop((x, y, x + w, y + h)).save(path, quality=90)
        paths.append(path)
    return paths


# Runs torchtool's entry point, then reports the process's peak RSS (VmHWM) on fd PEAK_FD. (ru_maxrss
# would not do: it carries over the RSS of this big benchmark process through fork and exec.)
_PEAK = """
import os, sys
from torchtool.cli import main
try:
    main(sys.argv[1:])
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    os.write(int(os.environ["PEAK_FD"]), hwm.encode())
"""


def run_cli(folder: Path, out: Path, extra: list[str], peak: bool = False) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (MiB; with ``peak``) and the summary of one torchtool process."""
    args = ["extract-features", str(folder), "--model", "resnet18", "--weights", "none",
            "--layer", "gap", "--out", str(out), "--json", "--quiet", "--overwrite", *extra]
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-c", _PEAK, *args] if peak else [TORCHTOOL, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, pass_fds=(write_fd,) if peak else (),
                          env={**os.environ, "PEAK_FD": str(write_fd)})
    seconds = time.perf_counter() - start
    os.close(write_fd)
    kib = os.read(read_fd, 64)
    os.close(read_fd)
    if proc.returncode != 0:
        raise SystemExit(f"torchtool failed: {proc.stderr.decode()}")
    return seconds, int(kib or 0) // 1024, json.loads(proc.stdout)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class ForwardOnly:
    """Forward passes alone on pre-decoded, pre-batched tensors already on the device: the limit.

    ``measure()`` gives images/s of (the plain torchvision model, torchtool's FeatureExtractor
    as the command builds it), each timed over at least 4 s.
    """

    def __init__(self, paths: list[Path], batch_size: int, device: str):
        built = build_model("resnet18", "none")
        tf = preprocess_transform(built.preprocess)
        tensors = torch.stack([tf(load_image(p)) for p in paths])
        cl = torch.channels_last
        self.ours = FeatureExtractor(built.model, ["gap"], arch="resnet18", fold_bn=True).to(device, memory_format=cl)
        self.plain = built.model.eval().to(device, memory_format=cl)
        self.batches = [b.to(device).contiguous(memory_format=cl) for b in tensors.split(batch_size)]
        self.device, self.n = device, len(paths)

    def measure(self) -> tuple[float, float]:
        rates = []
        with torch.inference_mode():
            for model in (self.plain, self.ours):
                model(self.batches[0])  # warm-up: oneDNN/cuDNN pick their kernels on the first call
                _sync(self.device)
                start, done = time.perf_counter(), 0
                while done == 0 or time.perf_counter() - start < 4.0:  # long enough to even out noise
                    for b in self.batches:
                        model(b)
                    done += self.n
                    _sync(self.device)
                rates.append(done / (time.perf_counter() - start))
        return rates[0], rates[1]


def naive_loop(paths: list[Path], device: str) -> float:
    """The recipe: open each image, transform, model(x[None]), one at a time."""
    model = torchvision.models.resnet18().eval().to(device)
    tf = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device=device))
        _sync(device)
        start = time.perf_counter()
        for p in paths:
            model(tf(Image.open(p).convert("RGB"))[None].to(device)).cpu()
        return len(paths) / (time.perf_counter() - start)


def _link(paths: list[Path], folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for p in paths:
        if not (folder / p.name).exists():
            os.link(p, folder / p.name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--naive-images", type=int, default=150)
    ap.add_argument("--mem-images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="each figure is the median of this many rounds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, help="default: torchtool's own (16 on CPU, 64 on GPUs)")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    args = ap.parse_args()
    batch = args.batch_size or (16 if args.device == "cpu" else 64)
    what = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    print(f"machine: {what}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"batch {batch}, workers {args.workers}, {args.rounds} rounds (medians of per-round figures)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_photos(tmp / "photos", max(args.images, args.mem_images))
        main_dir = _link(paths[: args.images], tmp / "main")
        cli = ["-b", str(batch), "-j", str(args.workers), "--device", args.device]

        # Each round brackets the whole-process run (a) between two measurements of (b) and of (c),
        # and the ratios are taken per round: this VM's speed drifts by +-15% over tens of seconds.
        forward = ForwardOnly(paths[: min(args.images, 400)], batch, args.device)
        runs: dict[str, list[float]] = {k: [] for k in ("a", "loop", "b", "ours", "c", "a/b", "loop/b", "a/ours",
                                                         "a/c")}
        for _ in range(args.rounds):
            b1, ours1 = forward.measure()
            c1 = naive_loop(paths[: args.naive_images], args.device)
            seconds, _, summary = run_cli(main_dir, tmp / "out", cli)
            b2, ours2 = forward.measure()
            c2 = naive_loop(paths[: args.naive_images], args.device)
            a, loop = args.images / seconds, summary["images_per_s"]
            b, ours, c = (b1 + b2) / 2, (ours1 + ours2) / 2, (c1 + c2) / 2
            for key, value in (("a", a), ("loop", loop), ("b", b), ("ours", ours), ("c", c), ("a/b", a / b),
                               ("loop/b", loop / b), ("a/ours", a / ours), ("a/c", a / c)):
                runs[key].append(value)
        m = {k: statistics.median(v) for k, v in runs.items()}
        print(f"(a) torchtool extract-features, whole process: {m['a']:7.2f} images/s "
              f"({args.images} images in {args.images / m['a']:.1f} s, start-up included; "
              f"{m['loop']:.2f} images/s in its loop)")
        print(f"(b) forward only, pre-decoded batches:         {m['b']:7.2f} images/s (torchvision's resnet18)")
        print(f"    the same with torchtool's extractor:       {m['ours']:7.2f} images/s (BatchNorm folded)")
        print(f"(c) naive loop (PIL + model(x[None])):         {m['c']:7.2f} images/s ({args.naive_images} images)")
        print(f"ratio (a)/(b) = {m['a/b']:.2f}   (goal >= 0.9; its loop alone {m['loop/b']:.2f}; "
              f"against torchtool's own forward {m['a/ours']:.2f})")
        print(f"ratio (a)/(c) = {m['a/c']:.2f}   (goal >= 1.3)")
        print("per round: " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in r) for k, r in runs.items()))

        rss_by_n = {}
        for n in (200, args.mem_images):
            folder = _link(paths[:n], tmp / f"mem{n}")
            rss_by_n[n] = run_cli(folder, tmp / f"outmem{n}", ["--image-size", "64", "--resize", "72", "-b", "64",
                                                             "-j", str(args.workers), "--device", args.device],
                                  peak=True)[1]
        grow = rss_by_n[args.mem_images] - rss_by_n[200]
        print(f"peak RSS: {rss_by_n[200]} MiB for 200 images, {rss_by_n[args.mem_images]} MiB for "
              f"{args.mem_images} images (64 px): +{grow} MiB (goal <= 100 MB)")


if __name__ == "__main__":
    main()
