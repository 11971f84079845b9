"""timm:resnet18 against torchvision's resnet18, both from scratch, with the same finetune recipe on the digits.

Claim: on scikit-learn's digits (all 1,797 real 8x8 handwritten digits, written as 32 px grey
PNGs in class folders, 20% of each class held out by --val-split 0.2), 5 epochs at --image-size 32
--crop-pct 1.0, `--model timm:resnet18` reaches within 0.5 points of `--model resnet18`.

Both run the recipe of benchmarks/finetune.py's issue-17 claim (--augment none, batch 64, AdamW
lr 1e-3 weight decay 0.01 on every parameter, cosine, --workers 0), through the installed
`torchtool` executable, one after the other, for each seed; --seed also seeds the split, so
both models of a seed see the same images. The exact commands are printed. The figure of a
run is its best validation accuracy; the difference is timm minus torchvision, per seed and
as a mean. (Random init differs by library: timm's ResNet zero-initialises the last BatchNorm
weight of each block, zero_init_last=True; torchvision's does not, zero_init_residual=False.)

    python benchmarks/finetune_timm.py [--seeds 0 1 2] [--epochs 5] [--data DIR]

Exits 1 when the mean difference is more than 0.5 points behind.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TORCHTOOL = str(Path(sys.executable).with_name("torchtool"))
MODELS = ("resnet18", "timm:resnet18")
SIZE = 32
RECIPE = ["--val-split", "0.2", "--weights", "none", "--image-size", str(SIZE), "--crop-pct", "1.0",
          "--augment", "none", "--batch-size", "64", "--optimizer", "adamw", "--lr", "0.001",
          "--weight-decay", "0.01", "--decay-all", "--schedule", "cosine", "--workers", "0"]


def write_digit_folders(root: Path) -> Path:
    """root/<digit>/NNNN.png: every one of scikit-learn's 1,797 digits, 16 grey levels -> 0-255, 32 px."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L")
        grey.resize((SIZE, SIZE), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


def finetune(data: Path, out: Path, model: str, seed: int, epochs: int) -> tuple[dict, list[float], float]:
    """One `torchtool finetune` process: (its JSON summary, val accuracy by epoch, wall seconds)."""
    argv = [TORCHTOOL, "finetune", str(data), "--out", str(out), "--model", model, "--epochs", str(epochs),
            "--seed", str(seed), *RECIPE, "--overwrite", "--json", "--quiet"]
    print("  $ " + shlex.join(["torchtool", *argv[1:]]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"torchtool finetune failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(out / "metrics.csv", newline="") as fh:
        accs = [float(row["val_acc"]) for row in csv.DictReader(fh)]
    return json.loads(proc.stdout), accs, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--data", type=Path, help="an existing class-folder copy of the digits (default: written to a "
                    "temporary folder)")
    args = ap.parse_args()
    import timm
    import torch
    import torchvision

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")
    print(f"recipe (both models): {args.epochs} epochs, {' '.join(RECIPE)}")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_digit_folders(Path(tmp) / "digits")
        print(f"data: {data}, {sum(1 for _ in data.rglob('*.png'))} images in {len(list(data.iterdir()))} classes")
        diffs, best = [], {m: [] for m in MODELS}
        for seed in args.seeds:
            print(f"seed {seed}:")
            got = {}
            for model in MODELS:
                summary, accs, seconds = finetune(data, Path(tmp) / f"run-{seed}-{model.replace(':', '_')}", model,
                                                  seed, args.epochs)
                got[model] = summary["best_val_acc"]
                best[model].append(got[model])
                print(f"    {model:<14} val accuracy by epoch {' '.join(f'{a:.4f}' for a in accs)}  best "
                      f"{got[model]:.4f} ({summary['val_images']} val images, {seconds:.0f} s)", flush=True)
            diffs.append(100 * (got["timm:resnet18"] - got["resnet18"]))
            print(f"    difference timm - torchvision: {diffs[-1]:+.2f} points")
    mean = statistics.mean(diffs)
    print(f"best val accuracy, mean over seeds {args.seeds}: "
          + ", ".join(f"{m} {statistics.mean(v):.4f}" for m, v in best.items()))
    spread = f" (per seed {' '.join(f'{d:+.2f}' for d in diffs)}" + \
        (f", sd {statistics.stdev(diffs):.2f})" if len(diffs) > 1 else ")")
    met = mean >= -0.5
    print(f"mean difference timm - torchvision: {mean:+.2f} points{spread}; goal >= -0.50: "
          f"{'met' if met else 'NOT met'}")
    if not met:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
