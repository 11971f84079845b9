"""The CUDA paths, checked on a real GPU in one short run (CI has no GPU; run this where one is).

    python benchmarks/gpu_check.py [--out DIR] [--bench]

env-info's GPU fields, NVML driver and the GPU's name in its markdown; extract-features on
cuda against the CPU, with --amp, --dtype float16 and, with two or more GPUs visible, under
torchrun with 2 processes (nccl) against the single-process result; finetune on cuda with
--amp (every loss in metrics.csv finite) and --resume; evaluate on cuda and with --amp against the
CPU's report; profile on cuda (max_memory_allocated, --compare's fp16/bf16/cudnn.benchmark rows,
a pin_memory --dataloader sweep, CUDA kernels in --trace); gpu-reset through the real NVML and
/dev/nvidia*: a process holding 256 MB of CUDA memory listed, verified and ended (memory freed), an
NVML monitor left alone; extract-features on videos (cuda and --amp against the CPU); evaluate's
insight outputs on cuda (--bootstrap, pictures, --html, full scores read back, --compare). Prints one PASS/FAIL line per check
(SKIP for the nccl check on a one-GPU machine: a one-process group exercises no collective)
and exits 1 if any failed. Takes a few minutes; --bench adds the extract-features benchmark
on the GPU (up to ~7 minutes more).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
TORCHTOOL = [sys.executable, "-m", "torchtool"]
results: list[tuple[str, bool, str]] = []
skipped: list[str] = []
DEV = "cuda"  # --device cpu: a dry run of the script itself


def sh(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)
    print(f"$ {' '.join(map(str, cmd))}  -> exit {proc.returncode} in {time.perf_counter() - start:.1f} s")
    if proc.stderr.strip():
        print("  stderr: " + proc.stderr.strip()[-1500:].replace("\n", "\n  "))
    return proc


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def skip(name: str, reason: str) -> None:
    skipped.append(name)
    print(f"SKIP {name}: {reason}", flush=True)


def guarded(fn):
    def run(*args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            check(fn.__name__, False, f"{type(exc).__name__}: {exc}")
    return run


@guarded
def env_info(work: Path) -> None:
    proc = sh(*TORCHTOOL, "env-info", "--json")
    info = json.loads(proc.stdout)
    cuda, nv = info["cuda"], info["nvidia"]
    print(json.dumps({"cuda": cuda, "nvidia": nv}, indent=1))
    check("env-info cuda available", cuda["available"] and cuda["device_count"] >= 1 and cuda["gpus"],
          f"{[g.get('name') for g in cuda['gpus']]}")
    check("env-info NVML driver", bool(nv.get("driver_version")), f"driver {nv.get('driver_version')}")
    req = sh(*TORCHTOOL, "env-info", "--require", "cuda", "--require", "cudnn", "--min-gpus", "1")
    check("env-info --require cuda cudnn --min-gpus 1", req.returncode == 0)
    import torch

    # markdown lists GPUs as nested items, "  - index: 0, name: NVIDIA H200, ...", with *_`| escaped
    name = torch.cuda.get_device_name(0)
    shown = re.sub(r"([*_`|])", r"\\\1", name)
    item = re.compile(r"^\s*- index: 0, name: " + re.escape(shown) + r"(,|$)", re.MULTILINE)
    md = sh(*TORCHTOOL, "env-info", "--format", "markdown")
    check("env-info markdown names the GPU", md.returncode == 0 and item.search(md.stdout) is not None,
          f"looked for {name!r} as GPU 0")


def extract(work: Path, photos: Path, out: str, *extra: str) -> dict:
    proc = sh(*TORCHTOOL, "extract-features", photos, "-m", "resnet18", "-w", "none", "-l", "gap,layer3",
              "--pool", "layer3:avg", "-o", work / out, "--json", "-q", "--overwrite", *extra)
    if proc.returncode != 0:
        raise RuntimeError(f"extract-features {out} failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout)


def load(work: Path, out: str, layer: str) -> np.ndarray:
    return np.load(work / out / f"{layer}.npy").astype(np.float32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


@guarded
def extract_features(work: Path, photos: Path) -> None:
    extract(work, photos, "cpu", "--device", "cpu")
    s = extract(work, photos, "cuda", "--device", DEV)
    check("extract cuda runs", s["ok"] == s["rows"], f"{s['rows']} rows, {s['images_per_s']} img/s")
    for layer in ("gap", "layer3"):
        r = rel(load(work, "cuda", layer), load(work, "cpu", layer))
        check(f"extract cuda == cpu ({layer})", r < 1e-2, f"max rel diff {r:.2e} (TF32 convs allowed)")
    meta = json.loads((work / "cuda" / "meta.json").read_text())
    check("extract cuda meta complete", meta["complete"] is True)
    s = extract(work, photos, "amp", "--device", DEV, "--amp")
    gap = load(work, "amp", "gap")
    r = rel(gap, load(work, "cuda", "gap"))
    check("extract cuda --amp", np.isfinite(gap).all() and r < 5e-2, f"max rel diff vs fp32 {r:.2e}, "
          f"{s['images_per_s']} img/s")
    extract(work, photos, "f16", "--device", DEV, "--dtype", "float16")
    arr = np.load(work / "f16" / "gap.npy")
    check("extract --dtype float16", arr.dtype == np.float16 and np.isfinite(arr).all())
    import torch

    if torch.cuda.device_count() < 2:
        skip("nccl", "one GPU visible, a one-process group exercises no collective")
        return
    # two ranks, one GPU each, every other row each, into the same files: broadcast and barriers over nccl
    proc = sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torchtool",
              "extract-features", photos, "-m", "resnet18", "-w", "none", "-l", "gap,layer3", "--pool", "layer3:avg",
              "-o", work / "ddp", "--json", "-q", "--overwrite", "--device", DEV)
    if proc.returncode != 0:
        check("extract under torchrun (nccl, 2 processes)", False, f"exit {proc.returncode}")
        return
    meta = json.loads((work / "ddp" / "meta.json").read_text())
    diffs = {layer: rel(load(work, "ddp", layer), load(work, "cuda", layer)) for layer in ("gap", "layer3")}
    # each rank batches other rows, on its own GPU: allow rounding (TF32), not a wrong or missing row (~1)
    ok = meta["complete"] is True and meta["counts"]["ok"] == meta["rows"] and max(diffs.values()) < 1e-2
    check("extract under torchrun (nccl, 2 processes) == 1 process", ok,
          f"{meta['counts']['ok']}/{meta['rows']} rows, max rel diff " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def _number(cell: str | None) -> float:
    """A metrics.csv cell as a float; an empty or unreadable cell is NaN (and fails the check)."""
    try:
        return float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


@guarded
def finetune(work: Path) -> None:
    from tests.finetune_data import write_digits

    data = write_digits(work / "digits", train_per_class=60, val_per_class=15, size=32)
    common = ["-m", "resnet18", "-w", "none", "--image-size", "32", "-b", "64", "-o", work / "ft", "--json", "-q",
              "--device", DEV, "--amp", "--augment", "light"]
    proc = sh(*TORCHTOOL, "finetune", data, "--epochs", "2", *common, "--overwrite")
    s = json.loads(proc.stdout)
    print(json.dumps(s, indent=1)[:1500])
    with open(work / "ft" / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    losses = [_number(r.get(k)) for r in rows for k in ("train_loss", "val_loss")]
    finite = len(rows) == 2 and all(math.isfinite(x) for x in losses)  # fp16 overflow shows as NaN/inf first
    check("finetune cuda --amp 2 epochs, every loss finite",
          proc.returncode == 0 and (work / "ft" / "best.pth").exists() and finite,
          f"{len(rows)} epochs in metrics.csv, train/val losses {[round(x, 4) for x in losses]}")
    proc = sh(*TORCHTOOL, "finetune", data, "--epochs", "3", "-o", work / "ft", "--json", "-q", "--resume")
    check("finetune cuda --resume", proc.returncode == 0, proc.stdout[-300:])
    import torch

    ckpt = torch.load(work / "ft" / "last.pth", map_location="cpu", weights_only=True)
    check("finetune checkpoint epoch 3", ckpt.get("epoch") == 3, f"epoch={ckpt.get('epoch')}")
    proc = sh(*TORCHTOOL, "extract-features", work / "digits" / "val", "-w", work / "ft" / "best.pth", "-l", "logits",
              "-o", work / "ftfeat", "--json", "-q", "--device", DEV)
    check("extract-features from the finetune checkpoint on cuda", proc.returncode == 0)
    evaluate(work, data)


def evaluate(work: Path, data: Path) -> None:
    """evaluate of the finetune checkpoint on the GPU (fp32 and --amp) against the CPU's report.

    A comparison needs both reports: a failed CPU run is a FAIL of every comparison, never a pass
    between two failures. Non-finite logits (NaN weights, on the GPU with --amp) exit 1 with one line.
    """
    reports = {}
    for name, extra in (("cpu", ["--device", "cpu"]), ("cuda", ["--device", DEV]), ("amp", ["--device", DEV, "--amp"])):
        proc = sh(*TORCHTOOL, "evaluate", work / "ft" / "best.pth", "--json", "-q", *extra)
        try:
            reports[name] = json.loads(proc.stdout) if proc.returncode == 0 else None
        except ValueError:
            reports[name] = None
        check(f"evaluate {name} runs", reports[name] is not None and reports[name].get("images", 0) > 0,
              f"exit {proc.returncode} {proc.stderr[-300:]}")
    cpu = reports["cpu"]
    for name in ("cuda", "amp"):
        got = reports[name]
        if cpu is None or got is None:
            check(f"evaluate {name} == cpu", False, "no CPU reference report" if cpu is None else f"no {name} report")
            continue
        # TF32 / bf16 may flip an image whose top two scores are within rounding of each other
        differ = sum(abs(a["recall"] * a["support"] - b["recall"] * b["support"])
                     for a, b in zip(cpu["per_class"], got["per_class"]))
        check(f"evaluate {name} == cpu", got["images"] == cpu["images"] and differ <= 2,
              f"accuracy {got['accuracy']:.4f} vs {cpu['accuracy']:.4f}, {differ:.0f} image(s) differ")
    import torch
    import torchvision

    state = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    state["fc.bias"][3] = float("nan")
    torch.save(state, work / "nan.pth")
    proc = sh(*TORCHTOOL, "evaluate", "-m", "resnet18", "-w", work / "nan.pth", "--data", data / "val", "--json", "-q",
              "--device", DEV, "--amp")
    lines = proc.stderr.strip().splitlines()
    check("evaluate cuda --amp: non-finite outputs exit 1 in one line", proc.returncode == 1 and not proc.stdout
          and bool(lines) and "are not finite (NaN or Inf)" in lines[0] and len(lines) == 2, proc.stderr[-300:])
    evaluate_insight(work)


def evaluate_insight(work: Path) -> None:
    """The insight outputs on the GPU: the intervals, pictures and page; the full scores read back to the
    same report; a model compared with itself in one pass (McNemar's p is 1.0)."""
    ckpt, out = work / "ft" / "best.pth", work / "insight"
    out.mkdir(exist_ok=True)
    proc = sh(*TORCHTOOL, "evaluate", ckpt, "--json", "-q", "--device", DEV, "--bootstrap", "200", "--overwrite",
              "--gallery", out / "gallery.png", "--calibration-plot", out / "calibration.png", "--html",
              out / "report.html", "--save-predictions", out / "preds.csv", "--scores", "all")
    report = json.loads(proc.stdout) if proc.returncode == 0 else {}
    files = [out / n for n in ("gallery.png", "calibration.png", "report.html", "preds.csv", "preds.scores.npy")]
    check("evaluate cuda --bootstrap --gallery --calibration-plot --html", bool(report.get("ci"))
          and report.get("loss") is not None and all(f.exists() for f in files), proc.stderr[-300:])
    back = sh(*TORCHTOOL, "evaluate", "--predictions", out / "preds.csv", "--json", "-q", "--bootstrap", "200")
    again = json.loads(back.stdout) if back.returncode == 0 else {}
    same = all(again.get(k) == report.get(k) for k in ("accuracy", "loss", "ci", "ranking", "top_k"))
    check("evaluate cuda --scores all: --predictions gives the same report", bool(report) and same,
          back.stderr[-300:])
    proc = sh(*TORCHTOOL, "evaluate", ckpt, "--compare", ckpt, "--json", "-q", "--device", DEV)
    test = (json.loads(proc.stdout).get("comparison") or {}).get("mcnemar", {}) if proc.returncode == 0 else {}
    check("evaluate cuda --compare itself: p = 1.0", test.get("p_value") == 1.0 and not test.get("a_only"),
          proc.stderr[-300:])


@guarded
def video_features(work: Path) -> None:
    """extract-features on videos on the GPU against the CPU (frames decoded in the workers, --segments 4)."""
    import cv2

    videos = work / "videos"
    videos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (suffix, fourcc) in enumerate(((".mp4", "mp4v"), (".avi", "MJPG"), (".mkv", "XVID"))):
        writer = cv2.VideoWriter(str(videos / f"clip{i}{suffix}"), cv2.VideoWriter_fourcc(*fourcc), 25, (160, 120))
        base = rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)
        for t in range(40 + 10 * i):
            writer.write(np.ascontiguousarray(base[t % 40:t % 40 + 120, t % 40:t % 40 + 160]))
        writer.release()
    feats = {}
    for name, extra in (("cpu", ["--device", "cpu"]), ("cuda", ["--device", DEV]), ("amp", ["--device", DEV, "--amp"])):
        proc = sh(*TORCHTOOL, "extract-features", videos, "-m", "resnet18", "-w", "none", "-l", "gap", "--segments",
                  "4", "-o", work / f"vid-{name}", "--json", "-q", "--overwrite", *extra)
        feats[name] = np.load(work / f"vid-{name}" / "gap.npy") if proc.returncode == 0 else None
        if name != "cpu":
            ok = feats[name] is not None and feats["cpu"] is not None and feats[name].shape == (3, 4, 512)
            r = rel(feats[name], feats["cpu"]) if ok else float("nan")
            check(f"extract-features videos {name} == cpu", ok and r < (5e-2 if name == "amp" else 1e-2),
                  f"max rel diff {r:.2e}" if ok else proc.stderr[-300:])


@guarded
def profile(work: Path, photos: Path) -> None:
    """profile on CUDA: max_memory_allocated, the CUDA rows of --compare, a pin_memory sweep, CUDA kernels traced."""
    trace = work / "trace.json"
    proc = sh(*TORCHTOOL, "profile", "resnet18", "--device", DEV, "--batch-size", "16", "--compare", "--tips",
              "channels_last,bf16,fp16,cudnn_benchmark,inference_mode,fold_bn", "--backward", "--dataloader", photos,
              "--dataloader-images", "64", "--trace", trace, "--overwrite", "--max-time", "1", "--json", "-q")
    report = json.loads(proc.stdout) if proc.returncode == 0 else None
    check("profile cuda runs", report is not None, proc.stderr[-300:])
    if report is None:
        return
    fwd, step = report["forward"], report["training_step"]
    check("profile cuda forward: max_memory_allocated > 0, throughput = B / median",
          (fwd["peak_memory_bytes"] or 0) > 0 and math.isclose(fwd["samples_per_s"], 16e3 / fwd["median_ms"]),
          f"{fwd['median_ms']:.2f} ms, {fwd['samples_per_s']:.0f}/s, {fwd['peak_memory_bytes']} B; "
          f"training step {step['median_ms']:.2f} ms")
    rows = {r["tip"]: r for r in report["compare"]}
    for tip in ("channels_last", "bf16", "fp16", "cudnn_benchmark", "fold_bn"):
        row = rows[tip]
        check(f"profile cuda --compare {tip}", not row["skipped"] and row["within_tolerance"],
              row["skipped"] or f"{row['speedup']:.2f}x, error {row['max_rel_error']:.1e}")
    check("profile cuda --dataloader sweeps pin_memory",
          {r["pin_memory"] for r in report["dataloader"]["rows"]} == {False, True}, report["bottleneck"] or "")
    kernels = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    check("profile cuda --trace holds CUDA kernels", len(kernels) > 0, f"{len(kernels)} kernel events")


def _nvidia_files(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return sorted({os.readlink(fd) for fd in fds.iterdir() if os.readlink(fd).startswith("/dev/nvidia")})
    except OSError:
        return []


def _holds(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code + "; print('ready', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


@guarded
def gpu_reset(work: Path) -> None:
    """gpu-reset through the real NVML and the real /dev/nvidia*: a CUDA process is verified and ended, an NVML
    monitor is left alone (what it holds is printed), and (--yes only when the dry run would end nothing else)
    the CUDA memory is freed."""
    holder = _holds(f"import time, torch; x = torch.empty(256 << 20, dtype=torch.uint8, device='{DEV}')")
    monitor = _holds("import time, pynvml; pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0); "
                     "pynvml.nvmlDeviceGetMemoryInfo(h)")
    try:
        for name, proc in (("CUDA holder", holder), ("NVML monitor", monitor)):
            print(f"  {name} {proc.pid} holds {_nvidia_files(proc.pid)}")
        print(sh(*TORCHTOOL, "gpu-reset", "--dry-run").stdout)
        proc = sh(*TORCHTOOL, "gpu-reset", "--dry-run", "--json")
        report = json.loads(proc.stdout) if proc.returncode == 0 else {"processes": []}
        rows = {r["pid"]: r for r in report["processes"]}
        mine = rows.get(holder.pid, {})
        check("gpu-reset --dry-run lists a CUDA process through NVML, verified in /proc",
              mine.get("kind") == "cuda" and (mine.get("memory_bytes") or 0) >= 256 << 20
              and mine.get("action") == "end" and holder.poll() is None, json.dumps(mine)[:300])
        watcher = rows.get(monitor.pid)
        check("gpu-reset leaves an NVML monitor alone", watcher is None or watcher["action"] == "leave",
              json.dumps(watcher)[:300])
        for r in report["processes"]:
            if r["action"] == "leave" and r["pid"] not in (holder.pid, monitor.pid):
                print(f"  left alone: {r['pid']} {(r['command'] or '')[:40]}: {r['reason']}")
        others = [r["pid"] for r in report["processes"] if r["action"] == "end" and r["pid"] != holder.pid]
        if others:  # a lent machine: never end what this script did not start
            skip("gpu-reset --yes", f"it would also end {others}")
            return
        proc = sh(*TORCHTOOL, "gpu-reset", "--yes", "--json", "--timeout", "10")
        report = json.loads(proc.stdout) if proc.returncode == 0 else {"processes": [], "gpus": []}
        ended = [r["result"] for r in report["processes"] if r["pid"] == holder.pid]
        freed = sum(g["freed_bytes"] for g in report["gpus"] or [])
        check("gpu-reset --yes ends the CUDA process and frees its memory, the monitor still runs",
              ended == ["ended (SIGTERM)"] and freed >= 256 << 20 and monitor.poll() is None,
              f"{ended}, freed {freed / 2 ** 20:.0f} MiB")
    finally:
        for proc in (holder, monitor):
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gpu-check")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from extract_features import make_photos

    photos = work / "photos"
    make_photos(photos, 256)
    env_info(work)
    extract_features(work, photos)
    video_features(work)
    finetune(work)
    profile(work, photos)
    gpu_reset(work)
    if args.bench:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "extract_features.py"), "--device", DEV,
                        "--images", "3000", "--naive-images", "300", "--mem-images", "1000", "--rounds", "1"],
                       timeout=400, check=False)
    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed"
          + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
