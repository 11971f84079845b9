"""extract-features on 12-megapixel JPEGs: the exact decode against --fast-decode, in one run.

    python benchmarks/photos.py [--photos 100] [--rounds 3] [--decode-photos 30] [--keep DIR]

(~6 minutes on 2 cores, most of it making the photos; --keep DIR makes them once and reuses them.)

The photos: --photos 4032x3024 JPEGs (quality 92), each an upscaled crop of one of
scikit-learn's bundled photos with sensor-like Gaussian noise (sigma 3), so they compress
like camera photos (~2 MB) instead of like smooth upscales (~0.3 MB).

(1) decode + Resize(256) + CenterCrop(224) of one photo, the CPU time of this process
    (one thread, as in a loader worker), exact and --fast-decode alternating photo by photo,
    over --decode-photos photos; their ratio; and how close the fast crops are: PSNR of the
    224 crops and the cosine similarity of resnet18 `gap` features (random-init weights,
    BatchNorm folded, as the command runs it) of the two paths;
(2) the whole `torchtool extract-features --model resnet18 --layer gap` process over the
    photos, exact and --fast-decode: images/s whole-process (start-up included) and in the
    extraction loop (the command's own images_per_s), and their ratios;
(3) forward-only images/s on pre-decoded batches (the limit; benchmarks/extract_features.py's (b)).
Each round runs (3), exact, fast, (3) again: the ratios are taken per round; the figures
are medians over rounds. Exits 1 when a goal is not met.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_features import ForwardOnly, run_cli  # noqa: E402

from torchtool.core.data import load_image  # noqa: E402
from torchtool.core.data.images import DecodeFloor  # noqa: E402
from torchtool.core.data.transforms import CenterCrop  # noqa: E402

SIZE = (4032, 3024)


def _one_photo(job: tuple[Path, int]) -> int:
    from sklearn.datasets import load_sample_images

    path, i = job
    rng = np.random.default_rng(i)
    base = load_sample_images().images[i % 2]  # 427x640
    h, w = base.shape[:2]
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0) * 3 / 4)
    ch = min(ch, h)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = Image.fromarray(base[y:y + ch, x:x + cw]).resize(SIZE, Image.BICUBIC)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (SIZE[1], SIZE[0], 3)).astype(np.float32)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return path.stat().st_size


def make_photos(folder: Path, n: int) -> list[Path]:
    """``n`` camera-like 12-megapixel JPEGs in ``folder`` (kept when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:04d}.jpg" for i in range(n)]
    todo = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        started = time.perf_counter()
        with multiprocessing.Pool(os.cpu_count()) as pool:
            pool.map(_one_photo, todo)
        print(f"made {len(todo)} photos in {time.perf_counter() - started:.0f} s")
    sizes = [p.stat().st_size for p in paths]
    print(f"photos: {n} JPEGs of {SIZE[0]}x{SIZE[1]} (quality 92), {statistics.mean(sizes) / 1e6:.2f} MB each on "
          f"average ({min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f})")
    return paths


def decode_costs(paths: list[Path]) -> bool:
    """(1): CPU ms per photo of decode + crop on each path, PSNR and feature cosine of the crops.

    True when both goals (CPU ratio, PSNR) are met."""
    from torchtool.core.data.transforms import Normalize
    from torchtool.core.features import FeatureExtractor
    from torchtool.core.models import build_model

    torch.set_num_threads(1)
    crop = CenterCrop(224, 256)
    floor = DecodeFloor(256)
    cpu = {"exact": [], "fast": []}
    crops = {"exact": [], "fast": []}
    for k, path in enumerate(paths):
        order = ("exact", "fast") if k % 2 == 0 else ("fast", "exact")
        for name in order:
            started = time.process_time()
            out = crop(load_image(path, decode=floor if name == "fast" else None))
            cpu[name].append(time.process_time() - started)
            crops[name].append(out)
    exact, fast = torch.stack(crops["exact"]).float(), torch.stack(crops["fast"]).float()
    mse = ((exact - fast) ** 2).flatten(1).mean(1)
    psnr = 10 * torch.log10(255 ** 2 / mse)
    torch.set_num_threads(os.cpu_count() or 1)
    built = build_model("resnet18", "none")
    model = FeatureExtractor(built.model, ["gap"], arch="resnet18", fold_bn=True).eval()
    normalize = Normalize(built.preprocess.mean, built.preprocess.std)
    with torch.inference_mode():
        fe = model(normalize(torch.stack(crops["exact"])))["gap"].flatten(1)
        ff = model(normalize(torch.stack(crops["fast"])))["gap"].flatten(1)
    cosine = torch.nn.functional.cosine_similarity(fe, ff)
    me, mf = statistics.median(cpu["exact"]) * 1000, statistics.median(cpu["fast"]) * 1000
    ratio = me / mf
    met = {"ratio": ratio >= 4, "psnr": float(psnr.min()) >= 40}
    print(f"(1) decode + Resize(256) + CenterCrop(224), CPU time per photo (one thread, {len(paths)} photos, "
          f"alternating): exact {me:.1f} ms, --fast-decode {mf:.1f} ms (median): {ratio:.2f}x less "
          f"(goal >= 4x, {'met' if met['ratio'] else 'NOT met'})")
    print(f"    closeness of the 224 crops: PSNR min {psnr.min():.1f} dB, median {psnr.median():.1f} dB (goal >= 40 dB, "
          f"{'met' if met['psnr'] else 'NOT met'}); resnet18 gap feature cosine min {cosine.min():.6f}, "
          f"median {cosine.median():.6f}")
    return all(met.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--decode-photos", type=int, default=30, help="photos timed one by one in (1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--keep", type=Path, help="make the photos in this folder once and reuse them")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, workers {args.workers}, batch 16, "
          f"{args.rounds} rounds (medians of per-round figures)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.keep or tmp / "photos"
        paths = make_photos(folder, args.photos)
        decode_met = decode_costs(paths[: args.decode_photos])
        forward = ForwardOnly(paths[:16], 16, "cpu")
        keys = ("exact_a", "exact_loop", "fast_a", "fast_loop", "forward", "loop_ratio", "a_ratio",
                "exact_loop/forward", "fast_loop/forward")
        runs: dict[str, list[float]] = {k: [] for k in keys}
        cli = ["-b", "16", "-j", str(args.workers), "--device", "cpu"]
        for _ in range(args.rounds):
            f1 = forward.measure()[1]
            exact_s, exact = run_cli(folder, tmp / "out", cli)
            fast_s, fast = run_cli(folder, tmp / "out", [*cli, "--fast-decode"])
            f2 = forward.measure()[1]
            values = (len(paths) / exact_s, exact["images_per_s"], len(paths) / fast_s, fast["images_per_s"],
                      (f1 + f2) / 2)
            values += (values[3] / values[1], values[2] / values[0], values[1] / values[4], values[3] / values[4])
            for key, value in zip(keys, values):
                runs[key].append(value)
        m = {k: statistics.median(v) for k, v in runs.items()}
        print(f"(2) torchtool extract-features --model resnet18 --layer gap over {len(paths)} photos:")
        print(f"    exact:         {m['exact_a']:6.2f} images/s whole process, {m['exact_loop']:6.2f} in the loop")
        print(f"    --fast-decode: {m['fast_a']:6.2f} images/s whole process, {m['fast_loop']:6.2f} in the loop")
        loop_met = m["loop_ratio"] >= 2
        print(f"    ratio fast/exact: loop {m['loop_ratio']:.2f}x (goal >= 2x, "
              f"{'met' if loop_met else 'NOT met'}), whole process {m['a_ratio']:.2f}x")
        print(f"(3) forward only, pre-decoded batches: {m['forward']:6.2f} images/s; the loop reaches "
              f"{m['exact_loop/forward']:.2f} of it exact, {m['fast_loop/forward']:.2f} with --fast-decode")
        print("per round: " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in r) for k, r in runs.items()))
    if not (decode_met and loop_met):
        raise SystemExit(1)  # a goal above is NOT met


if __name__ == "__main__":
    main()
