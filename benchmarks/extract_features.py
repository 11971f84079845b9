"""extract-features throughput and memory, against its limit and the naive recipe, in one run.

    python benchmarks/extract_features.py [--images 5000] [--naive-images 150] [--mem-images 2000]
                                          [--rounds 3] [--device cpu|cuda] [--model resnet18] [--layer gap]
                                          [--no-memory]

(~11 minutes on 2 cores; --images 1000 --rounds 2 for a quick look. The whole process pays a
fixed ~4 s start-up, mostly importing torch and torchvision, so (a)/(b) grows with --images.)

(a) the whole `torchtool extract-features` process (start-up included), --model (resnet18) at its
    own input size, --layer (gap), random init (--weights none);
(b) forward-only throughput on pre-decoded tensor batches of the very module (a) runs:
    torchtool's FeatureExtractor with BatchNorm folded into the convolutions (the limit);
(b') the same batches through the library's own plain model (BatchNorm not folded, ~15% slower
    for resnet18), printed beside it for reference: torchvision's get_model(NAME), or for
    timm:NAME timm.create_model(NAME, pretrained=False);
(c) the naive loop of the recipe: PIL open, transform, model(x[None]) one image at a time, with
    that plain model and its library's own transform (torchvision: the DEFAULT weights'
    transforms(); timm: create_transform(**resolve_data_config({}, model=m))).
The goals ((a)/(b) >= 0.9, (a)/(c) >= 1.3, memory) are resnet18/gap's claims: judged for it only.
Each round measures (b), (b') and (c) before and after (a), and the ratios are taken per
round; the figures are medians over rounds. The headline ratio is (a)/(b), the command
against its own forward pass; (a)/(b') is shown beside it, labelled.

Then memory (always resnet18; --no-memory skips it): `--layer layer3` at 224 px (256x14x14
float32, ~200 KB a row) over 200 and --mem-images images, workers included. The whole process
tree (torchtool and every descendant, found through the ppid in /proc/*/stat) is sampled every
50 ms; the figures are
the peak of the summed PSS (/proc/PID/smaps_rollup: shared pages, e.g. those of forked
loader workers, are split between the processes that map them, not counted once per
process), the peak of the summed RSS (which double-counts them) and the main process's
VmHWM, with the growth from 200 to --mem-images images. The rows are written with pwrite
(torchtool.core.features.store.RowFile; a memory map's written pages would count in the
writer's RSS and PSS as file-backed pages, ~200 MB per 1,000 layer3 rows); whatever stays
mapped is included, nothing is subtracted. The main
process's RssAnon/RssFile and the tree's anonymous/file PSS at the peak (file-backed: torch's
shared libraries as well as the output) and the split of the PSS growth into anonymous and
file-backed pages show how much of it is heap and how much is the output file.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images

from torchtool.core.data import load_image
from torchtool.core.data.transforms import preprocess_transform
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


def _cli_args(folder: Path, out: Path, model: str, layer: str, extra: list[str]) -> list[str]:
    return ["extract-features", str(folder), "--model", model, "--weights", "none", "--layer", layer,
            "--out", str(out), "--json", "--quiet", "--overwrite", *extra]


def run_cli(folder: Path, out: Path, extra: list[str], model: str = "resnet18", layer: str = "gap") -> tuple[float, dict]:
    """Wall seconds and the summary of one `torchtool extract-features --model MODEL --layer LAYER` process."""
    start = time.perf_counter()
    proc = subprocess.run([TORCHTOOL, *_cli_args(folder, out, model, layer, extra)], capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"torchtool failed: {proc.stderr.decode()}")
    return seconds, json.loads(proc.stdout)


# Runs torchtool's entry point, then reports the process's exact peak RSS (VmHWM, KiB) on fd
# PEAK_FD. (ru_maxrss would not do: it carries over the RSS of this big benchmark process
# through fork and exec.)
_PEAK = """
import os, sys
from torchtool.cli import main
try:
    main(sys.argv[1:])
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    os.write(int(os.environ["PEAK_FD"]), hwm.encode())
"""


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the ppid field of every /proc/*/stat.

    (/proc/PID/task/*/children would be cheaper, but needs CONFIG_PROC_CHILDREN, which
    not every kernel has.)
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:  # gone meanwhile
                continue
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # after "pid (comm) state"
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """``Name:  123 kB`` lines of a /proc file -> {name: KiB} (missing fields are 0)."""
    out = dict.fromkeys(names, 0)
    with open(path, encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0])
    return out


_ROLLUP = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")
_STATUS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


@dataclass
class MemoryPeak:
    """Peaks of one process tree, in KiB; the ``at_peak`` fields are from the sample of peak PSS."""

    pss: int = 0  # summed PSS of the tree, at its peak
    rss: int = 0  # summed RSS of the tree, at its peak (a sample of its own)
    hwm: int = 0  # the main process's VmHWM
    samples: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)  # tree Pss_Anon/Pss_File/Pss_Shmem, main RssAnon/RssFile


def _sample(root: int) -> tuple[dict[str, int], dict[str, int], int] | None:
    """The tree's summed smaps_rollup fields, the main process's status fields, the number of processes."""
    total = dict.fromkeys(_ROLLUP, 0)
    pids = _tree(root)
    for pid in pids:
        try:
            for key, kib in _kib_fields(f"/proc/{pid}/smaps_rollup", _ROLLUP).items():
                total[key] += kib
        except (OSError, ValueError):  # a worker that just exited
            continue
    try:
        main = _kib_fields(f"/proc/{root}/status", _STATUS)
    except (OSError, ValueError):
        return None
    return total, main, len(pids)


def run_memory(folder: Path, out: Path, extra: list[str], interval: float = 0.05) -> MemoryPeak:
    """One `torchtool extract-features --layer layer3` process tree, sampled every ``interval`` s."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK, *_cli_args(folder, out, "resnet18", "layer3", extra)],
                                stdout=subprocess.DEVNULL, stderr=err, pass_fds=(write_fd,),
                                env={**os.environ, "PEAK_FD": str(write_fd)})
        os.close(write_fd)
        peak = MemoryPeak()
        while proc.poll() is None:
            got = _sample(proc.pid)
            if got is not None and got[0]["Pss"]:  # all zero once the process is a zombie
                tree, main, n = got
                peak.samples += 1
                peak.rss = max(peak.rss, tree["Rss"])
                if tree["Pss"] > peak.pss:
                    peak.pss = tree["Pss"]
                    peak.at_peak = {"processes": n, "pss_anon": tree["Pss_Anon"], "pss_file": tree["Pss_File"],
                                    "pss_shmem": tree["Pss_Shmem"], "main_anon": main["RssAnon"],
                                    "main_file": main["RssFile"], "main_shmem": main["RssShmem"]}
            time.sleep(interval)
        peak.hwm = int(os.read(read_fd, 64) or 0)
        os.close(read_fd)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"torchtool failed: {err.read().decode()[-2000:]}")
    return peak


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_model(name: str) -> tuple[torch.nn.Module, Any]:
    """The library's own model (random init) and its own evaluation transform: timm for ``timm:NAME``,
    else torchvision."""
    if name.startswith("timm:"):
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(name[len("timm:"):], pretrained=False)
        return model, create_transform(**resolve_data_config({}, model=model))
    return torchvision.models.get_model(name), torchvision.models.get_model_weights(name).DEFAULT.transforms()


class ForwardOnly:
    """Forward passes alone on pre-decoded, pre-batched tensors already on the device: the limit.

    ``measure()`` gives images/s of (the library's plain model, torchtool's FeatureExtractor
    as the command builds it), each timed over at least 4 s.
    """

    def __init__(self, paths: list[Path], batch_size: int, device: str, model: str = "resnet18", layer: str = "gap"):
        built = build_model(model, "none")
        tf = preprocess_transform(built.preprocess)
        tensors = torch.stack([tf(load_image(p)) for p in paths])
        cl = torch.channels_last
        self.ours = FeatureExtractor(built.model, [layer], arch=built.arch, fold_bn=True).to(device, memory_format=cl)
        self.plain = plain_model(model)[0].eval().to(device, memory_format=cl)
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


def naive_loop(paths: list[Path], device: str, model_name: str = "resnet18") -> float:
    """The recipe: open each image, transform, model(x[None]), one at a time."""
    model, tf = plain_model(model_name)
    model = model.eval().to(device)
    with torch.no_grad():
        model(tf(Image.open(paths[0]).convert("RGB"))[None].to(device))  # warm-up at the transform's size
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
    ap.add_argument("--mem-images", type=int, default=2000, help="the memory check's large run (the small one: 200)")
    ap.add_argument("--rounds", type=int, default=3, help="each figure is the median of this many rounds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, help="default: torchtool's own (16 on CPU, 64 on GPUs)")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--model", default="resnet18", help="a torchvision name or timm:NAME (random init)")
    ap.add_argument("--layer", default="gap")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory check (resnet18's layer3)")
    args = ap.parse_args()
    judged = (args.model, args.layer) == ("resnet18", "gap")  # the claim's goals are this configuration's
    if not args.no_memory and args.mem_images <= 200:
        ap.error("--mem-images must be more than 200 (the memory growth is measured from 200 images)")
    batch = args.batch_size or (16 if args.device == "cpu" else 64)
    what = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    print(f"machine: {what}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"batch {batch}, workers {args.workers}, {args.rounds} rounds (medians of per-round figures), "
          f"model {args.model}, layer {args.layer}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_photos(tmp / "photos", max(args.images, 0 if args.no_memory else args.mem_images))
        main_dir = _link(paths[: args.images], tmp / "main")
        cli = ["-b", str(batch), "-j", str(args.workers), "--device", args.device]

        # Each round brackets the whole-process run (a) between two measurements of (b), (b') and (c),
        # and the ratios are taken per round: this VM's speed drifts by +-15% over tens of seconds.
        forward = ForwardOnly(paths[: min(args.images, 400)], batch, args.device, args.model, args.layer)
        keys = ("a", "loop", "own", "plain", "c", "a/own", "loop/own", "a/plain", "loop/plain", "a/c")
        runs: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(args.rounds):
            plain1, own1 = forward.measure()
            c1 = naive_loop(paths[: args.naive_images], args.device, args.model)
            seconds, summary = run_cli(main_dir, tmp / "out", cli, args.model, args.layer)
            plain2, own2 = forward.measure()
            c2 = naive_loop(paths[: args.naive_images], args.device, args.model)
            a, loop = args.images / seconds, summary["images_per_s"]
            own, plain, c = (own1 + own2) / 2, (plain1 + plain2) / 2, (c1 + c2) / 2
            for key, value in zip(keys, (a, loop, own, plain, c, a / own, loop / own, a / plain, loop / plain, a / c)):
                runs[key].append(value)
        m = {k: statistics.median(v) for k, v in runs.items()}
        print(f"(a)  torchtool extract-features, whole process: {m['a']:7.2f} images/s "
              f"({args.images} images in {args.images / m['a']:.1f} s, start-up included; "
              f"{m['loop']:.2f} images/s in its loop)")
        print(f"(b)  forward only, pre-decoded batches:         {m['own']:7.2f} images/s "
              "(torchtool's extractor, BatchNorm folded: the module (a) runs)")
        source = "timm" if args.model.startswith("timm:") else "torchvision"
        label = f"(b') the same, {source}'s plain model:"
        print(f"{label:<48}{m['plain']:7.2f} images/s "
              "(BatchNorm not folded; for reference)")
        print(f"(c)  naive loop (PIL + model(x[None])):         {m['c']:7.2f} images/s ({args.naive_images} images)")
        failed = [name for name, ok in (("(a)/(b)", m["a/own"] >= 0.9), ("(a)/(c)", m["a/c"] >= 1.3)) if not ok]
        failed = failed if judged else []

        def verdict(ok: bool) -> str:
            return ("met" if ok else "NOT met") if judged else f"not judged for {args.model}/{args.layer}"

        print(f"ratio (a)/(b)  = {m['a/own']:.2f}   (goal >= 0.9, {verdict(m['a/own'] >= 0.9)}: the command against "
              f"its own folded forward pass; its loop alone {m['loop/own']:.2f})")
        print(f"ratio (a)/(b') = {m['a/plain']:.2f}   (against {source}'s plain model, not the one (a) runs: "
              f"not judged; its loop alone {m['loop/plain']:.2f})")
        print(f"ratio (a)/(c)  = {m['a/c']:.2f}   (goal >= 1.3, {verdict(m['a/c'] >= 1.3)})")
        print("per round: " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in r) for k, r in runs.items()))
        if not args.no_memory and not memory(paths, tmp, cli, args.mem_images, args.workers):
            failed.append("memory")
    if failed:  # a goal NOT met fails the run
        raise SystemExit(f"goals NOT met: {', '.join(failed)}")


def memory(paths: list[Path], tmp: Path, cli: list[str], n_big: int, workers: int) -> bool:
    """Peak memory of the whole process tree for 200 and ``n_big`` images of --layer layer3 at 224 px;
    True when its goal is met."""
    peaks = {}
    for n in (200, n_big):
        peaks[n] = run_memory(_link(paths[:n], tmp / f"mem{n}"), tmp / f"outmem{n}", cli)
    small, big = peaks[200], peaks[n_big]
    row_bytes = 256 * 14 * 14 * 4
    print(f"memory: `extract-features --layer layer3` (256x14x14 float32, {row_bytes / 1000:.0f} KB a row) at 224 px, "
          f"{workers} workers, 200 vs {n_big} images, the whole process tree (torchtool + its loader workers) "
          f"sampled every 50 ms ({small.samples} and {big.samples} samples); 1 MiB = 2^20 bytes, 1 MB = 10^6 bytes")

    def line(label: str, kib_small: int, kib_big: int, note: str) -> float:
        grow = (kib_big - kib_small) * 1024
        per_1000 = grow / 1e6 / ((n_big - 200) / 1000)
        print(f"  {label:<34} {kib_small / 1024:7.0f} MiB for 200, {kib_big / 1024:7.0f} MiB for {n_big}: "
              f"{grow / 2**20:+6.0f} MiB, {per_1000:+6.1f} MB per 1000 images  ({note})")
        return per_1000

    per_1000 = line("peak PSS, summed over the tree", small.pss, big.pss,
                    "shared pages split between the processes that map them")
    line("peak RSS, summed over the tree", small.rss, big.rss, "counts pages shared with forked workers once per process")
    line("main process VmHWM", small.hwm, big.hwm, "peak RSS of the torchtool process alone, workers excluded")
    for label, peak in (("200", small), (str(n_big), big)):
        at = peak.at_peak
        print(f"  at the PSS peak of the {label}-image run ({at['processes']} processes): tree PSS anon "
              f"{at['pss_anon'] / 1024:.0f} MiB, file {at['pss_file'] / 1024:.0f} MiB, shmem {at['pss_shmem'] / 1024:.0f} MiB; "
              f"main process RssAnon {at['main_anon'] / 1024:.0f} MiB, RssFile {at['main_file'] / 1024:.0f} MiB, "
              f"RssShmem {at['main_shmem'] / 1024:.0f} MiB")
    anon = (big.at_peak["pss_anon"] - small.at_peak["pss_anon"]) / 1024
    filed = (big.at_peak["pss_file"] - small.at_peak["pss_file"]) / 1024
    print(f"  PSS growth at the peaks: anonymous (heap, tensors) {anon:+.0f} MiB, file-backed {filed:+.0f} MiB; "
          f"layer3.npy grows by {(n_big - 200) * row_bytes / 2**20:.0f} MiB from 200 to {n_big} rows")
    print(f"  the output layer3.npy is {n_big * row_bytes / 2**20:.0f} MiB for {n_big} rows, written with pwrite: "
          "its pages are the kernel's page cache, not mapped into the writer (a memory map's would count in RSS "
          "and PSS as file-backed pages). Every mapped page is included in the figures here, nothing subtracted.")
    goal = 100 / 1.8  # the claim: <= 100 MB more for 2000 images than for 200
    verdict = "met" if per_1000 <= goal else "NOT met"
    print(f"  goal: <= 100 MB growth from 200 to 2000 images (<= {goal:.1f} MB per 1000 images), judged on the "
          f"tree's summed PSS, file-backed pages included: {per_1000:+.1f} MB per 1000 images, {verdict}")
    return per_1000 <= goal


if __name__ == "__main__":
    main()
