"""`torchtool summary` against torchinfo: whole-process wall time and peak RSS, in one run.

    python benchmarks/summary.py [--rounds 3]

(~2 minutes on 2 cores.) Each command is a fresh process, timed from here; its peak RSS is
the kernel's account of that child alone (os.wait4's ru_maxrss; this script imports
nothing heavy, so the fork it starts from is small):

    floor      python -c "import torch, torchvision"        (what any summary must pay)
    torchinfo  python -c "torchinfo.summary(torchvision.models.NAME(), input_size=(1, 3, 224, 224))"
    torchtool  torchtool summary NAME

on resnet50 and vgg16, and torchtool alone on a 25-billion-parameter torch.nn.Transformer
(101 GB of float32 weights; torchinfo would have to allocate them). Rounds run every command
in turn, the order reversed each round; figures are medians. Goals: torchtool faster than
torchinfo, and its peak RSS within 10% of the import floor for every model; exit status 1
when a goal is not met.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _timing import machine, torchtool_exe

BIG = ('{"d_model": 6144, "nhead": 48, "num_encoder_layers": 24, "num_decoder_layers": 24, '
       '"dim_feedforward": 24576, "batch_first": true}')


def commands() -> dict[str, list[str]]:
    exe, py = torchtool_exe(), sys.executable
    torchinfo = ("import torchinfo, torchvision; torchinfo.summary(torchvision.models.{}(), "
                 "input_size=(1, 3, 224, 224), device='cpu')")
    # the floor leaves as torchtool does (os._exit: no second of freeing torch's modules at teardown)
    found = {"floor (import torch, torchvision)": [py, "-c", "import os, torch, torchvision; os._exit(0)"]}
    for name in ("resnet50", "vgg16"):
        found[f"torchinfo {name}"] = [py, "-c", torchinfo.format(name)]
        found[f"torchtool {name}"] = [exe, "summary", name]
    found["torchtool 25B transformer"] = [exe, "summary", "torch.nn:Transformer", "--kwargs", BIG,
                                          "--input-size", "128,6144", "--input-size", "128,6144"]
    return found


def measure(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one run of ``argv``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.decode()[-500:]}")
    return elapsed, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cmds = commands()
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
    for argv in cmds.values():  # warm-up: file caches
        measure(argv)
    for r in range(args.rounds):
        for name in (list(cmds) if r % 2 == 0 else list(cmds)[::-1]):
            results[name].append(measure(cmds[name]))
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    floor_t, floor_m = med["floor (import torch, torchvision)"]
    print(f"summary benchmark on {machine()}; {args.rounds} rounds, medians of whole processes")
    print(f"{'command':36} {'wall s':>8} {'peak RSS MB':>12} {'RSS / floor':>12}")
    for name, (t, m) in med.items():
        print(f"{name:36} {t:8.2f} {m / 1e6:12.0f} {m / floor_m:12.3f}")
    ok = True
    for name in ("resnet50", "vgg16"):
        ours, theirs = med[f"torchtool {name}"], med[f"torchinfo {name}"]
        print(f"{name}: time torchtool/torchinfo = {ours[0] / theirs[0]:.3f}, "
              f"peak RSS torchtool/torchinfo = {ours[1] / theirs[1]:.3f}")
        ok &= ours[0] < theirs[0]
    worst = max(m for k, (_, m) in med.items() if k.startswith("torchtool")) / floor_m
    ok &= worst <= 1.10
    print(f"largest torchtool peak RSS / import floor = {worst:.3f} (goal <= 1.10); "
          f"goals {'met' if ok else 'NOT met'}")
    if not ok:  # a script or CI reading only the exit status sees it too
        sys.exit(1)


if __name__ == "__main__":
    main()
