"""``torchtool demo``: small real inputs made offline, and the command lines that show every command on them.

:func:`make_inputs` writes scikit-learn's bundled handwritten digits as an image folder,
crops of its two sample photos and a few short OpenCV videos; :func:`plan` gives the
command lines, in order, that the demo runs through the CLI itself; :func:`report` reads
what they wrote back. Nothing is downloaded: models start from random weights.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchtool.core.files import atomic_write_text
from torchtool.core.output import UsageError, to_json

DIGIT_SIZE = 32


@dataclass
class Step:
    """One command line of the demo and what it is for."""

    name: str
    argv: list[str]  # after `torchtool`
    why: str

    @property
    def line(self) -> str:
        """The command line as a person would type it."""
        return shlex.join(["torchtool", *self.argv])


@dataclass
class Inputs:
    """Where :func:`make_inputs` put each input, and how many there are."""

    digits: Path  # digits/train/<0-9>/*.png, digits/val/<0-9>/*.png
    photos: Path  # photos/*.jpg
    videos: Path  # videos/*.mp4
    counts: dict[str, int] = field(default_factory=dict)


MANIFEST = ".torchtool-demo.json"  # the demo's own entries in --out: all --overwrite may remove
SUBFOLDERS = ("digits", "photos", "videos", "run", "features", "frames")
FILES = ("report.csv", "confusion.png")


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Make ``out`` ready for a demo run; with ``overwrite``, remove only what an earlier demo made there.

    The demo writes its manifest (the names it is about to create) before anything else, so an
    interrupted demo is replaced as cleanly as a finished one. A non-empty folder without a manifest
    is someone's own: refused, with or without ``overwrite``; so is a demo folder in which one of the
    demo's names was made by someone else.
    """
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder", hint="give --out a new or empty folder")
    manifest = out / MANIFEST
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    if entries and not manifest.is_file():
        raise UsageError(f"{out} is not empty and was not made by torchtool demo (it has no {MANIFEST}); "
                         "nothing in it was touched", hint="choose a new or empty folder for --out")
    if entries:
        if not overwrite:
            raise UsageError(f"{out} already holds a demo", hint="pass --overwrite to replace the demo's own "
                             "outputs (nothing else in the folder is touched), or choose another --out")
        ours = set(_read_manifest(manifest))
        foreign = sorted(name for name in (*SUBFOLDERS, *FILES) if name in entries and name not in ours)
        if foreign:
            raise UsageError(f"{out / foreign[0]} was not made by the demo; nothing was removed",
                             hint="move it away, or choose another --out")
        for name in ours:
            _remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, to_json({"made_by": "torchtool demo", "entries": [*SUBFOLDERS, *FILES]}) + "\n")
    return out


def _read_manifest(path: Path) -> list[str]:
    """The demo's names a manifest lists: only plain names the demo uses (a tampered one removes nothing else)."""
    try:
        listed = json.loads(path.read_text(encoding="utf-8")).get("entries", [])
    except (OSError, ValueError, AttributeError):
        raise UsageError(f"{path} is not a demo manifest; nothing was removed",
                         hint="choose another --out") from None
    return [name for name in listed if name in (*SUBFOLDERS, *FILES)]


def _remove(path: Path) -> None:
    """Remove one of the demo's entries; a link is removed, never what it points to."""
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def make_inputs(out: Path, quick: bool) -> Inputs:
    """Write the demo's digits, photo crops and videos under ``out``."""
    digits = write_digits(out / "digits", per_class=40 if quick else None)
    photos = _photos(out / "photos", 12 if quick else 32)
    videos = _videos(out / "videos", 2 if quick else 4)
    counts = {"train images": sum(1 for _ in (digits / "train").rglob("*.png")),
              "val images": sum(1 for _ in (digits / "val").rglob("*.png")),
              "photos": len(list(photos.iterdir())), "videos": len(list(videos.iterdir()))}
    return Inputs(digits, photos, videos, counts)


def write_digits(root: Path, per_class: int | None = None, val_fraction: float = 0.2) -> Path:
    """scikit-learn's 1,797 8x8 handwritten digits as 32 px grey PNGs in root/train|val/<digit>/,
    a seeded stratified split (``per_class``: only that many of each digit). benchmarks/finetune.py
    trains on the same folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(0)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(data.target == label))[:per_class]
        n_val = max(1, round(len(idx) * val_fraction))
        for k, i in enumerate(idx):
            folder = root / ("val" if k < n_val else "train") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (data.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


def _photos(root: Path, n: int) -> Path:
    """``n`` JPEG crops (96-256 px) of scikit-learn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % 2]
        w, h = (int(v) for v in rng.integers(96, 257, 2))
        x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
        photo.crop((x, y, x + w, y + h)).save(root / f"{('china', 'flower')[i % 2]}_{i:03d}.jpg", quality=90)
    return root


def _videos(root: Path, n: int, frames: int = 48) -> Path:
    """``n`` short MPEG-4 videos (96x72, 24 fps) of a ball crossing a gradient, written with OpenCV."""
    import cv2

    root.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:72, 0:96]
    for v in range(n):
        path = root / f"clip_{v}.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24.0, (96, 72))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path}")
        for t in range(frames + 12 * v):
            frame = np.dstack([(xs * 2 + t) % 256, (ys * 3) % 256, np.full_like(xs, 40 * v)]).astype(np.uint8)
            cv2.circle(frame, (8 + (t * 2) % 80, 36), 8, (255, 255, 255), -1)
            writer.write(frame)
        writer.release()
    return root


def plan(out: Path, inputs: Inputs, quick: bool, gpu: bool) -> list[Step]:
    """The demo's command lines, in order; every command appears (gpu-reset only where a GPU is)."""
    run, epochs = out / "run", 2 if quick else 4
    best = str(run / "best.pth")
    steps = [
        Step("env-info", ["env-info"], "what this machine offers PyTorch"),
        Step("summary", ["summary", "resnet18", "--kwargs", '{"num_classes": 10}', "--input-size",
                         f"3,{DIGIT_SIZE},{DIGIT_SIZE}", "--batch-size", "64", "--depth", "1"],
             "the model to train: layers, parameters, MACs and memory of a batch of 64, without running it"),
        Step("finetune", ["finetune", str(inputs.digits), "--model", "resnet18", "--weights", "none", "--image-size",
                          str(DIGIT_SIZE), "--crop-pct", "1.0", "--augment", "none", "--optimizer", "adamw",
                          "--lr", "0.001", "--weight-decay", "0.01", "--decay-all", "--batch-size", "64",
                          "--epochs", str(epochs), "--out", str(run)],
             f"resnet18 from scratch on the handwritten digits, {epochs} epochs"),
        Step("evaluate", ["evaluate", best, "--csv", str(out / "report.csv"), "--plot", str(out / "confusion.png")],
             "the best checkpoint on its validation images: per-class report and confusion matrix"),
        Step("extract-features", ["extract-features", str(inputs.photos), "--weights", best, "--layer", "gap,logits",
                                  "--out", str(out / "features")],
             "features of the fine-tuned network for the photo crops, one .npy per layer"),
        Step("video-info", ["video-info", str(inputs.videos), "--exact", "--segments", "4",
                            "--extract-frames", str(out / "frames")],
             "video metadata, TSN sampling of 4 frames per video, the frames written as JPEGs"),
        Step("profile", ["profile", best, "--batch-size", "16", "--compare", "--tips",
                         "channels_last,bf16,inference_mode,fold_bn", "--max-time", "0.3" if quick else "1"],
             "how fast the checkpoint runs here, and which speed tips pay"),
    ]
    if gpu:
        steps.append(Step("gpu-reset", ["gpu-reset", "--dry-run"], "who holds the GPUs (nothing is ended)"))
    return steps


def report(out: Path, seconds: dict[str, float]) -> dict[str, Any]:
    """The demo's final report: accuracy reached, where each output is, what to try next."""
    run = out / "run"
    summary: dict[str, Any] = {}
    metrics = run / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        best = max(rows, key=lambda r: float(r["val_acc"]))
        summary["accuracy"] = {"best_val_acc": float(best["val_acc"]), "best_epoch": int(best["epoch"]),
                               "epochs": len(rows)}
    meta = out / "features" / "meta.json"
    layers = json.loads(meta.read_text(encoding="utf-8"))["layers"] if meta.is_file() else {}
    files = {"learning curves": run / "curves.png", "confusion matrix": out / "confusion.png",
             "classification report": out / "report.csv", "best checkpoint": run / "best.pth",
             "run config": run / "config.json",
             **{f"features {name} {tuple(info['shape'])}": out / "features" / f"{name}.npy"
                for name, info in layers.items()},
             "video frames": out / "frames"}
    summary["files"] = {k: str(v) for k, v in files.items() if v.exists()}
    summary["seconds"] = {name: round(s, 1) for name, s in seconds.items()}
    summary["next"] = [
        f"open {run / 'curves.png'} and {out / 'confusion.png'}",
        "torchtool finetune YOUR_DATA/ --model resnet50 --out runs/first   (pretrained; YOUR_DATA/<class>/... "
        "with --val-split 0.2, or YOUR_DATA/train and YOUR_DATA/val)",
        "torchtool evaluate runs/first/best.pth --csv report.csv",
        "torchtool extract-features --model vgg16 --layer relu5_3 imgs/",
        "torchtool <command> --help for every option",
    ]
    return summary
