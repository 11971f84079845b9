"""finetune's timm-parity options end to end: crop-pct/interpolation into evaluate and extract-features,
EMA checkpoints, --keep-best, the --compile fallback."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from torchtool.cli import app
from torchtool.core.models import build_model
from torchtool.core.models.checkpoint import load_checkpoint

runner = CliRunner()
SMALL = ["--model", "mobilenet_v3_small", "--weights", "none", "--batch-size", "16", "--workers", "0",
         "--device", "cpu", "--quiet"]


def _finetune(data, out, *args):
    result = runner.invoke(app, ["finetune", str(data), "--out", str(out), *SMALL, *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_crop_pct_and_interpolation_reach_evaluate_and_extract_features(digits4, tmp_path):
    run = tmp_path / "run"
    _finetune(digits4, run, "--image-size", "24", "--crop-pct", "0.8", "--interpolation", "bicubic", "--augment",
              "none", "--epochs", "1")
    ckpt = load_checkpoint(run / "best.pth")
    assert ckpt["preprocess"]["crop_size"] == 24 and ckpt["preprocess"]["resize_size"] == 30  # floor(24 / 0.8)
    assert ckpt["preprocess"]["interpolation"] == "bicubic"

    report = runner.invoke(app, ["evaluate", str(run / "best.pth"), "--device", "cpu", "--workers", "0", "--json",
                                 "-q"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["source"]["preprocess"] == ckpt["preprocess"]

    image = sorted((digits4 / "val" / "2").iterdir())[0]
    feats = tmp_path / "feats"
    result = runner.invoke(app, ["extract-features", str(image), "--weights", str(run / "best.pth"), "--layer",
                                 "logits", "--device", "cpu", "--workers", "0", "-o", str(feats), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((feats / "meta.json").read_text())["preprocess"] == ckpt["preprocess"]
    # the same logits by hand: torchvision's bicubic Resize(30) and CenterCrop(24), then the model
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(30, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(24),
                     v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(ckpt["preprocess"]["mean"], ckpt["preprocess"]["std"])])
    model = build_model("mobilenet_v3_small", "none", num_classes=4).model
    model.load_state_dict(ckpt["model"])
    with torch.inference_mode():
        expected = model.eval()(tf(Image.open(image).convert("RGB"))[None])[0].numpy()
    np.testing.assert_allclose(np.load(feats / "logits.npy")[0], expected, rtol=1e-4, atol=1e-4)


def test_ema_is_validated_logged_and_saved(digits4, tmp_path):
    run = tmp_path / "run"
    # one epoch: the best epoch is the last, so best.pth can be checked against last.pth's weights either way
    summary = _finetune(digits4, run, "--image-size", "32", "--epochs", "1", "--ema", "0.5", "--augment", "light")
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "ema_val_loss",
                             "ema_val_acc", "ema_val_top5", "lr", "seconds"]
    assert all(float(r["val_top5"]) >= float(r["val_acc"]) and float(r["ema_val_top5"]) == 1.0 for r in rows)  # 4 classes
    last, best = load_checkpoint(run / "last.pth"), load_checkpoint(run / "best.pth")
    ema_weights = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert int(last["ema"]["n_averaged"]) == 4  # 64 images, batch 16: an update per step
    assert ema_weights.keys() == last["model"].keys()
    assert any(not torch.equal(v, last["model"][k]) for k, v in ema_weights.items())  # an average, not a copy
    row = rows[0]
    from_ema = float(row["ema_val_acc"]) > float(row["val_acc"])
    assert summary["best_epoch"] == 1 and summary["best_weights"] == ("ema" if from_ema else "model")
    assert summary["best_val_acc"] == pytest.approx(max(float(row["val_acc"]), float(row["ema_val_acc"])))
    source = ema_weights if from_ema else last["model"]  # best.pth holds the weights that did better
    assert all(torch.equal(v, source[k]) for k, v in best["model"].items())
    assert best.get("weights_from", "model") == summary["best_weights"]


def test_keep_best_keeps_exactly_n_ranked_checkpoints(digits4, tmp_path, resnet18_weights_pth):
    run = tmp_path / "run"
    # a head learning on frozen features: validation improves from chance, so epochs rank, and a new best
    # moves the old one down to best-2.pth (mobilenet from scratch sits at chance: every epoch ties)
    probe = ["--model", "resnet18", "--weights", resnet18_weights_pth, "--freeze-backbone", "--lr", "0.05"]
    summary = _finetune(digits4, run, *probe, "--image-size", "32", "--epochs", "4", "--keep-best", "2")
    with open(run / "metrics.csv", newline="") as fh:
        accs = [float(r["val_acc"]) for r in csv.DictReader(fh)]
    assert any(accs[e] > max(accs[:e]) for e in range(1, 4)), f"no epoch beat an earlier best: {accs}"
    ranked = sorted(range(1, 5), key=lambda e: -accs[e - 1])[:2]  # stable: a tie keeps the earlier epoch first
    assert sorted(p.name for p in run.glob("best*.pth")) == ["best-2.pth", "best.pth"]
    assert [load_checkpoint(run / n)["epoch"] for n in ("best.pth", "best-2.pth")] == ranked
    assert summary["kept"] == [str(run / "best.pth"), str(run / "best-2.pth")] and summary["best_epoch"] == ranked[0]
    resumed = _finetune(digits4, run, *probe, "--resume", "--epochs", "5", "--keep-best", "1")
    assert [p.name for p in run.glob("best*.pth")] == ["best.pth"] and len(resumed["kept"]) == 1
    commands = json.loads((run / "config.json").read_text())["commands"]
    assert [c["from_epoch"] for c in commands] == [0, 4]  # the resume is recorded beside the first command line


def test_compile_falls_back_with_one_line_when_it_cannot_compile(digits4, tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    # no C++ compiler: inductor cannot build its kernels, so the first training step fails to compile
    monkeypatch.setattr(inductor.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    result = runner.invoke(app, ["finetune", str(digits4), "--out", str(tmp_path / "run"), "--model", "squeezenet1_1",
                                 *SMALL[2:-1], "--image-size", "32", "--epochs", "1", "--compile", "--json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "--compile" in line]
    assert len(lines) == 1 and "training uncompiled" in lines[0] and "C++ compiler" in lines[0], result.stderr[-2000:]
    assert json.loads(result.stdout)["epochs"] == 1
