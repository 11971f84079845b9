"""extract-features throughput and memory, against its limit and the naive recipe, in one run.

    python benchmarks/extract_features.py [--images 600] [--naive-images 120] [--mem-images 2000]

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


def forward_only(paths: list[Path], batch_size: int, rounds: int = 3) -> tuple[float, float]:
    """Images/s of forward passes alone on pre-decoded, pre-batched tensors (median of ``rounds``):
    (the plain torchvision model, torchtool's FeatureExtractor as the command builds it)."""
    built = build_model("resnet18", "none")
    tf = preprocess_transform(built.preprocess)
    tensors = torch.stack([tf(load_image(p)) for p in paths])
    plain = built.model.eval().to(memory_format=torch.channels_last)
    ours = FeatureExtractor(built.model, ["gap"], arch="resnet18", fold_bn=True).to(memory_format=torch.channels_last)
    batches = [b.contiguous(memory_format=torch.channels_last) for b in tensors.split(batch_size)]
    rates: dict[str, list[float]] = {"plain": [], "ours": []}
    with torch.inference_mode():
        for _ in range(rounds):  # interleaved, so both see the same machine
            for name, model in (("plain", plain), ("ours", ours)):
                model(batches[0])  # warm-up: oneDNN picks its kernels on the first call
                start = time.perf_counter()
                for b in batches:
                    model(b)
                rates[name].append(len(paths) / (time.perf_counter() - start))
    return statistics.median(rates["plain"]), statistics.median(rates["ours"])


def naive_loop(paths: list[Path]) -> float:
    """The recipe: open each image, transform, model(x[None]), one at a time."""
    model = torchvision.models.resnet18().eval()
    tf = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
        start = time.perf_counter()
        for p in paths:
            model(tf(Image.open(p).convert("RGB"))[None])
        return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--naive-images", type=int, default=120)
    ap.add_argument("--mem-images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16, help="torchtool's CPU default")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_photos(tmp / "photos", max(args.images, args.mem_images))
        main_dir = tmp / "main"
        main_dir.mkdir()
        for p in paths[: args.images]:
            os.link(p, main_dir / p.name)

        seconds, rss, summary = run_cli(main_dir, tmp / "out", ["-b", str(args.batch_size), "-j", str(args.workers)])
        a = args.images / seconds
        b, b_ours = forward_only(paths[: min(args.images, 400)], args.batch_size)
        c = naive_loop(paths[: args.naive_images])
        loop = summary["images_per_s"]
        print(f"(a) torchtool extract-features, whole process: {a:7.2f} images/s "
              f"({args.images} images in {seconds:.1f} s; {loop:.2f} images/s inside the run)")
        print(f"(b) forward only, pre-decoded batches:         {b:7.2f} images/s (torchvision's resnet18)")
        print(f"    the same with torchtool's extractor:       {b_ours:7.2f} images/s (BatchNorm folded)")
        print(f"(c) naive loop (PIL + model(x[None])):         {c:7.2f} images/s ({args.naive_images} images)")
        print(f"ratio (a)/(b) = {a / b:.2f}   (goal >= 0.9; inside the run {loop / b:.2f}; "
              f"against torchtool's own forward {a / b_ours:.2f})")
        print(f"ratio (a)/(c) = {a / c:.2f}   (goal >= 1.3)")

        rss_by_n = {}
        for n in (200, args.mem_images):
            folder = tmp / f"mem{n}"
            folder.mkdir()
            for p in paths[:n]:
                os.link(p, folder / p.name)
            rss_by_n[n] = run_cli(folder, tmp / f"outmem{n}", ["--image-size", "64", "--resize", "72", "-b", "64",
                                                             "-j", str(args.workers)], peak=True)[1]
        grow = rss_by_n[args.mem_images] - rss_by_n[200]
        print(f"peak RSS: {rss_by_n[200]} MiB for 200 images, {rss_by_n[args.mem_images]} MiB for "
              f"{args.mem_images} images (64 px): +{grow} MiB (goal <= 100 MB)")


if __name__ == "__main__":
    main()
