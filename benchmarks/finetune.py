"""finetune on real data, against a plain hand-written PyTorch loop on the same data and settings.

Claims (issue 4): resnet18 from scratch reaches >= 95% validation accuracy on scikit-learn's
digits (1,797 real 8x8 handwritten digits, written as 32 px PNGs) in <= 5 epochs, and
finetune's epoch takes <= 1.15x the plain loop's. Rounds alternate plain / finetune so
machine noise hits both; the ratio is the median of per-round ratios of median epoch times,
and the ratio of the fastest epochs is printed too (on a shared machine other load only adds).
Issue 17: resnet18 from scratch on the digits at 32 px with --crop-pct 1.0 --augment none reaches
>= 98.5% in 5 epochs (beside the default 224/256 ratio and a plain loop on the uncropped images),
and the epoch time with and without --compile on this machine.
Run: python benchmarks/finetune.py [--rounds 3] [--workers 0] [--only-parity]
Exits 1 when a goal is not met.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from torchtool.core.demo import write_digits
from torchtool.core.models import IMAGENET_MEAN, IMAGENET_STD
from torchtool.core.train import TrainConfig, fit

# The settings both loops share: AdamW decaying every parameter (finetune's --decay-all), cosine.
SIZE, BATCH, LR, WD = 32, 64, 1e-3, 0.01


def plain_loop(data: Path, epochs: int, workers: int, seed: int,
               crop_pct: float = 224 / 256) -> tuple[list[float], list[float]]:
    """What people write by hand: ImageFolder, DataLoader, AdamW + cosine, CrossEntropyLoss. (accs, epoch seconds)."""
    torch.manual_seed(seed)
    tf = v2.Compose([v2.Resize(round(SIZE / crop_pct), antialias=True), v2.CenterCrop(SIZE), v2.PILToTensor(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = DataLoader(datasets.ImageFolder(data / "train", tf), batch_size=BATCH, shuffle=True, num_workers=workers,
                       persistent_workers=workers > 0, drop_last=True)
    val = DataLoader(datasets.ImageFolder(data / "val", tf), batch_size=BATCH, num_workers=workers,
                     persistent_workers=workers > 0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    accs, seconds = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in train:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        torch.save(model.state_dict(), data.parent / "plain_last.pth")  # a loop people trust saves every epoch
        seconds.append(time.perf_counter() - t0)
        accs.append(correct / total)
    return accs, seconds


def finetune(data: Path, out: Path, epochs: int, workers: int, seed: int,
             **settings: object) -> tuple[list[float], list[float], float]:
    """torchtool finetune with the same settings (in-process). (accs, epoch seconds, whole run seconds)."""
    cfg = TrainConfig(data=str(data), out=str(out), model="resnet18", weights="none", epochs=epochs,
                      batch_size=BATCH, workers=workers, image_size=SIZE, augment="none", optimizer="adamw", lr=LR,
                      weight_decay=WD, decay_all=True, schedule="cosine", seed=seed, **settings)
    t0 = time.perf_counter()
    fit(cfg, overwrite=True, quiet=True)
    total = time.perf_counter() - t0
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [float(r["val_acc"]) for r in rows], [float(r["seconds"]) for r in rows], total


def parity(data: Path, tmp: Path, epochs: int, workers: int, seed: int, compile_epochs: int) -> bool:
    """Issue 17: --crop-pct 1.0 against the weights' 224/256 ratio and a plain loop on the uncropped digits;
    epoch time with and without --compile. True when the accuracy goal is met."""
    print(f"crop: --crop-pct 1.0 --augment none (the {SIZE} px digits whole) against the default 224/256 ratio "
          f"(resize to {round(SIZE * 256 / 224)}, crop {SIZE}: the border is lost)")
    full, _, _ = finetune(data, tmp / "full", epochs, workers, seed, crop_pct=1.0)
    cropped, _, _ = finetune(data, tmp / "cropped", epochs, workers, seed)
    plain, _ = plain_loop(data, epochs, workers, seed, crop_pct=1.0)
    for label, accs in (("finetune --crop-pct 1.0", full), ("finetune (default ratio)", cropped),
                        ("plain loop, uncropped", plain)):
        print(f"  {label:<25} val accuracy by epoch {' '.join(f'{a:.4f}' for a in accs)}  best {max(accs):.4f}")
    met = max(full) >= 0.985
    print(f"  goal: >= 0.985 in {epochs} epochs with --crop-pct 1.0: {max(full):.4f}, {'met' if met else 'NOT met'}")
    print(f"compile: {compile_epochs} epochs each, --crop-pct 1.0, with and without --compile (in-process)")
    eager_acc, eager, eager_total = finetune(data, tmp / "eager", compile_epochs, workers, seed, crop_pct=1.0)
    comp_acc, comp, comp_total = finetune(data, tmp / "compiled", compile_epochs, workers, seed, crop_pct=1.0,
                                          compile=True)
    print(f"  eager    epoch seconds {' '.join(f'{x:.2f}' for x in eager)}  (whole run {eager_total:.1f} s, "
          f"best {max(eager_acc):.4f})")
    print(f"  compiled epoch seconds {' '.join(f'{x:.2f}' for x in comp)}  (whole run {comp_total:.1f} s, "
          f"best {max(comp_acc):.4f}; epoch 1 includes compiling)")
    later_e, later_c = statistics.median(eager[1:]), statistics.median(comp[1:])
    print(f"  epochs 2-{compile_epochs}, median: eager {later_e:.2f} s, compiled {later_c:.2f} s: compiled takes "
          f"{later_c / later_e:.2f}x the eager time; compiling cost {comp[0] - eager[0]:.1f} s in epoch 1")
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/finetune rounds")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-epochs", type=int, default=3)
    parser.add_argument("--only-parity", action="store_true", help="skip the plain-loop rounds (issue 4's claims)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"settings: resnet18 from scratch, {SIZE} px, batch {BATCH}, AdamW lr {LR} weight decay {WD}, cosine, "
          f"{args.epochs} epochs, workers {args.workers}, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp) / "digits")
        n_train = sum(1 for _ in (data / "train").rglob("*.png"))
        print(f"data: sklearn digits, {n_train} train / {sum(1 for _ in (data / 'val').rglob('*.png'))} val images")
        parity_met = parity(data, Path(tmp), args.epochs, args.workers, args.seed, args.compile_epochs)
        if args.only_parity:
            raise SystemExit(0 if parity_met else 1)
        plain_secs, ft_secs, ratios, totals = [], [], [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            p_acc, p_sec = plain_loop(data, args.epochs, args.workers, args.seed)
            p_total = time.perf_counter() - t0
            f_acc, f_sec, f_total = finetune(data, Path(tmp) / "run", args.epochs, args.workers, args.seed)
            plain_secs += p_sec
            ft_secs += f_sec
            ratios.append(statistics.median(f_sec) / statistics.median(p_sec))
            totals.append((p_total, f_total))
            print(f"round {r + 1}: val accuracy by epoch  plain    {' '.join(f'{a:.4f}' for a in p_acc)}")
            print(f"                                finetune {' '.join(f'{a:.4f}' for a in f_acc)}"
                  f"  (>= 0.95 from epoch {next((i + 1 for i, a in enumerate(f_acc) if a >= 0.95), 'never')})")
            print(f"         epoch seconds  plain    {' '.join(f'{x:.2f}' for x in p_sec)}")
            print(f"                        finetune {' '.join(f'{x:.2f}' for x in f_sec)}   ratio of medians "
                  f"{ratios[-1]:.3f}")
        p_med, f_med = statistics.median(plain_secs), statistics.median(ft_secs)
        n_images = sum(1 for _ in data.rglob("*.png"))
        print(f"epoch seconds, median of {len(plain_secs)}: plain {p_med:.2f}  finetune {f_med:.2f}  "
              f"({n_images / p_med:.0f} vs {n_images / f_med:.0f} images/s; an epoch is train + validate + save; "
              "finetune also writes best.pth, metrics.csv and curves.png)")
        ratio_met = statistics.median(ratios) <= 1.15
        print(f"ratio finetune/plain epoch: {statistics.median(ratios):.3f} (median of {len(ratios)} paired rounds; "
              f"goal <= 1.15, {'met' if ratio_met else 'NOT met'}); fastest epochs: {min(ft_secs):.2f} vs "
              f"{min(plain_secs):.2f} s, ratio {min(ft_secs) / min(plain_secs):.3f} (other load only ever adds time)")
        print(f"whole run incl. start-up, median: plain {statistics.median(t[0] for t in totals):.1f} s  finetune "
              f"{statistics.median(t[1] for t in totals):.1f} s")
        acc_met = max(f_acc) >= 0.95
        print(f"accuracy: finetune best {max(f_acc):.4f}, final {f_acc[-1]:.4f} after {args.epochs} epochs "
              f"(goal >= 0.95 in <= 5 epochs, {'met' if acc_met else 'NOT met'})")
        if not (acc_met and parity_met and ratio_met):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
