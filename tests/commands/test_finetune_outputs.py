"""What a finetune run shows and leaves: the summary as the user named --out, no empty rows, best.pth
without the optimizer state (yet resumable from), top-k named by what it counted."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from tests.finetune_data import write_digits
from torchtool.cli import app

runner = CliRunner()
SMALL = ["--model", "resnet18", "--weights", "none", "--image-size", "16", "--workers", "0", "--device", "cpu",
         "--batch-size", "16"]


def test_a_small_run_shows_what_it_made_and_keeps_best_pth_small(tmp_path, monkeypatch):
    write_digits(tmp_path / "digits", labels=range(3), train_per_class=12, val_per_class=4)  # 3 classes: top-k is top-3
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["finetune", "digits", "--out", "run", "--epochs", "1", "--optimizer", "adamw", *SMALL])
    assert result.exit_code == 0, result.output[-2000:]
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert rows["out"] == "run" and rows["best"] == "run/best.pth" and rows["last"] == "run/last.pth"
    assert "export" not in rows and "skipped" not in rows and rows["skipped_images"] == "0"
    epoch_line = next(line for line in result.stderr.splitlines() if line.startswith("torchtool: epoch 1/1"))
    assert " top3 " in epoch_line and "top5" not in epoch_line

    best, last = (torch.load(tmp_path / "run" / name, weights_only=True) for name in ("best.pth", "last.pth"))
    assert "optimizer" in last and "optimizer" not in best
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])  # the same weights
    # AdamW keeps two moments per weight: last.pth is about three times the weights, best.pth one
    assert (tmp_path / "run" / "best.pth").stat().st_size < 0.5 * (tmp_path / "run" / "last.pth").stat().st_size

    resumed = runner.invoke(app, ["finetune", "digits", "--out", "run", "--resume-from", "run/best.pth", "--epochs", "2",
                                  "--json", *SMALL])
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert "holds no optimizer state" in resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["epochs"] == 2 and summary["top_k"] == 3
    assert "export" in summary and summary["skipped"] == []  # JSON keeps every key for scripts
