"""`torchtool evaluate` throughput against `torchtool extract-features --layer gap`, in one run.

    python benchmarks/evaluate.py [--images 400] [--rounds 3] [--workers 2] [--batch-size 16]

(~3 minutes on 2 cores at the defaults; --images 200 --rounds 2 for a quick look.)

Both commands run the same resnet18 (torchvision's, random init, 2 classes, its state_dict
saved with torch.save and given as --weights W.pth) on the same images, on the CPU, with the
same --workers and --batch-size:

    torchtool evaluate --model resnet18 --weights W.pth --data DATA --device cpu --json
    torchtool extract-features DATA --model resnet18 --weights W.pth --layer gap --device cpu --json -o OUT --overwrite

Each figure is images / wall-clock seconds of the whole process (start-up included), timed
from here through subprocess. extract-features also reports the rate of its own loop
("images_per_s") and its "seconds", and so does evaluate, printed beside them; the image
counts are checked against the data set. (evaluate writes no feature files; that is expected.)
After one warm-up run of each, every round runs both, the order alternating from round to
round (A,B then B,A ...) so that this VM's drift hits both alike; the ratio evaluate/extract
is taken per round, and the figures are medians over rounds. Goal: ratio >= 0.9; the script
exits 1 when it is not met.
Inputs are real JPEG photos: random crops of scikit-learn's bundled china.jpg/flower.jpg,
resized, in DATA/china/ and DATA/flower/.

    python benchmarks/evaluate.py --insight [--epochs 2 | --checkpoint runs/digits/best.pth] [--rounds 3] [--workers 2]

Issue 27: the new figures must not slow evaluate down. The docs' digits example (the demo's
digits and its finetune recipe: resnet18 from scratch at 32 px, --epochs of it), then

    torchtool evaluate runs/digits/best.pth --device cpu --json
    torchtool evaluate runs/digits/best.pth --device cpu --json --bootstrap 1000 --calibration-plot C.png --gallery G.png

timed as whole processes, alternating, medians of per-round figures; goal: the second within
1.2x of the first (exit 1 when not).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import machine, torchtool_exe

GOAL = 0.9
INSIGHT_GOAL = 1.2  # the whole command with --bootstrap 1000 --calibration-plot --gallery, against plain evaluate
# the demo's finetune recipe (docs/commands/finetune.md), which the docs' evaluate example evaluates
RECIPE = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--crop-pct", "1.0", "--augment", "none",
          "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.01", "--decay-all", "--batch-size", "64"]
CLASSES = ("china", "flower")  # load_sample_images() gives china.jpg, flower.jpg in this order


def make_data(root: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs, alternately from each photo: a random crop (160-427 px a side), resized to 80-100%."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for i in range(n):
        img, name = photos[i % 2], CLASSES[i % 2]
        w, h = rng.randint(160, min(427, img.width)), rng.randint(160, min(427, img.height))
        x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        scale = rng.uniform(0.8, 1.0)
        crop = img.crop((x, y, x + w, y + h)).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        crop.save(root / name / f"{i:05d}.jpg", quality=90)


def make_weights(path: Path) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None, num_classes=len(CLASSES)).state_dict(), path)


def timed(argv: list[str]) -> tuple[float, dict]:
    """Wall seconds of one whole process, and the JSON it printed on stdout."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return seconds, json.loads(proc.stdout)


def insight(args: argparse.Namespace) -> None:
    """Issue 27: evaluate with --bootstrap 1000 --calibration-plot --gallery against plain evaluate, whole processes."""
    from torchtool.core.demo import write_digits

    exe = torchtool_exe()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            best = Path(args.checkpoint)
            print(f"checkpoint: {best} (as given)")
        else:
            data = write_digits(tmp / "digits")
            best = tmp / "runs" / "digits" / "best.pth"
            train = [exe, "finetune", str(data), *RECIPE, "--epochs", str(args.epochs), "--workers",
                     str(args.workers), "--device", "cpu", "--out", str(best.parent), "--quiet", "--json"]
            seconds, summary = timed(train)
            print(f"trained: resnet18 on the digits, {args.epochs} epochs in {seconds:.0f} s, "
                  f"best_val_acc {summary['best_val_acc']:.4f}")
        plain = [exe, "evaluate", str(best), "--device", "cpu", "--json", "--workers", str(args.workers)]
        full = [*plain, "--bootstrap", "1000", "--calibration-plot", str(tmp / "c.png"), "--gallery",
                str(tmp / "g.png"), "--overwrite"]
        timed(plain), timed(full)  # warm-up: page cache, the .pyc files, matplotlib's font cache
        times: dict[str, list[float]] = {"plain": [], "full": [], "ratio": []}
        for r in range(args.rounds):
            order = (plain, full) if r % 2 == 0 else (full, plain)
            got = {id(cmd): timed(cmd) for cmd in order}
            (t_plain, report), (t_full, full_report) = got[id(plain)], got[id(full)]
            if "ci" not in full_report or full_report["images"] != report["images"]:
                raise SystemExit("the full run did not report intervals on the same images")
            times["plain"].append(t_plain)
            times["full"].append(t_full)
            times["ratio"].append(t_full / t_plain)
            print(f"  round {r + 1} ({'plain' if order[0] is plain else 'full'} first): plain {t_plain:5.2f} s, "
                  f"full {t_full:5.2f} s, ratio {t_full / t_plain:.3f}")
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"evaluate, {report['images']} images:                          {m['plain']:5.2f} s  "
              f"(accuracy {report['accuracy']:.4f})")
        print(f"  + --bootstrap 1000 --calibration-plot --gallery: {m['full']:5.2f} s  "
              f"(accuracy {full_report['ci']['accuracy']} at 95%)")
        verdict = "met" if m["ratio"] <= INSIGHT_GOAL else "NOT met"
        print(f"ratio full/plain = {m['ratio']:.3f}  (median of per-round ratios "
              f"{', '.join(f'{x:.3f}' for x in times['ratio'])}; goal <= {INSIGHT_GOAL}, {verdict})")
    if verdict != "met":
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400, help="images in all, split evenly between the 2 classes")
    ap.add_argument("--rounds", type=int, default=3, help="each figure is the median of this many rounds")
    ap.add_argument("--workers", type=int, default=2, help="--workers for both commands")
    ap.add_argument("--batch-size", type=int, default=16, help="--batch-size for both commands")
    ap.add_argument("--insight", action="store_true", help="issue 27: --bootstrap/--calibration-plot/--gallery "
                    "against plain evaluate on the digits")
    ap.add_argument("--epochs", type=int, default=2, help="with --insight: epochs of the digits model")
    ap.add_argument("--checkpoint", help="with --insight: evaluate this digits checkpoint instead of training one")
    args = ap.parse_args()
    if args.insight:
        return insight(args)
    if args.images < 2 or args.rounds < 1:
        ap.error("--images must be at least 2 and --rounds at least 1")
    exe, n = torchtool_exe(), args.images
    print(f"machine: {machine()}")
    print(f"resnet18 (2 classes, random init), {n} images, device cpu, batch {args.batch_size}, "
          f"workers {args.workers}, {args.rounds} rounds after one warm-up each (medians of per-round figures)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, weights = tmp / "DATA", tmp / "W.pth"
        make_data(data, n)
        make_weights(weights)
        common = ["--model", "resnet18", "--weights", str(weights), "--device", "cpu", "--json",
                  "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
        evaluate = [exe, "evaluate", *common, "--data", str(data)]
        runs = 0

        def extract_cmd() -> list[str]:
            nonlocal runs
            runs += 1
            return [exe, "extract-features", str(data), *common, "--layer", "gap",
                    "-o", str(tmp / f"out{runs}"), "--overwrite"]

        def run_eval() -> tuple[float, dict]:
            seconds, summary = timed(evaluate)
            if summary.get("images") != n:
                raise SystemExit(f"evaluate reported {summary.get('images')} images, expected {n}")
            return seconds, summary

        def run_extract() -> tuple[float, dict]:
            seconds, summary = timed(extract_cmd())
            if summary.get("ok") != n:
                raise SystemExit(f"extract-features wrote {summary.get('ok')} rows of {n}: {summary}")
            return seconds, summary

        run_eval(), run_extract()  # warm-up: page cache, the .pyc files
        rows: dict[str, list[float]] = {k: [] for k in ("eval", "extract", "loop", "ratio", "eval_loop")}
        for r in range(args.rounds):
            if r % 2 == 0:
                t_eval, report = run_eval()
                t_ext, summary = run_extract()
            else:
                t_ext, summary = run_extract()
                t_eval, report = run_eval()
            ev, ex = n / t_eval, n / t_ext
            for key, value in zip(rows, (ev, ex, summary["images_per_s"], ev / ex, report["images_per_s"])):
                rows[key].append(value)
            order = "evaluate first" if r % 2 == 0 else "extract-features first"
            print(f"  round {r + 1} ({order}): evaluate {ev:6.2f} images/s ({t_eval:5.1f} s; its loop "
                  f"{report['images_per_s']:.2f} images/s), extract-features "
                  f"{ex:6.2f} images/s ({t_ext:5.1f} s; its loop {summary['images_per_s']:.2f} images/s over "
                  f"{summary['seconds']:.1f} s), ratio {ev / ex:.3f}")
        m = {k: statistics.median(v) for k, v in rows.items()}
        print(f"evaluate, whole process:         {m['eval']:7.2f} images/s  ({n} images in {n / m['eval']:.1f} s, "
              f"start-up included; {m['eval_loop']:.2f} images/s in its loop)")
        print(f"extract-features, whole process: {m['extract']:7.2f} images/s  ({n} images in {n / m['extract']:.1f} s, "
              f"start-up included; {m['loop']:.2f} images/s in its loop)")
        verdict = "met" if m["ratio"] >= GOAL else "NOT met"
        print(f"ratio evaluate/extract-features = {m['ratio']:.3f}  (median of per-round ratios "
              f"{', '.join(f'{x:.3f}' for x in rows['ratio'])}; goal >= {GOAL}, {verdict})")
    if verdict != "met":  # a script that checks a claim fails when the claim does not hold
        sys.exit(1)


if __name__ == "__main__":
    main()
