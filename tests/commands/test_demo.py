"""torchtool demo --quick end to end: every command runs, each output exists and is well-formed."""

from __future__ import annotations

import csv
import json

import numpy as np
from typer.testing import CliRunner

from torchtool.cli import COMMANDS, app

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_quick_runs_every_command_and_leaves_files_to_open(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    lines = result.stdout.splitlines()
    shown = [line.split()[2] for line in lines if line.startswith("$ torchtool ")]
    gpu_only = {"gpu-reset"}  # only where a GPU is present
    assert set(shown) | gpu_only == set(COMMANDS) - {"demo"} | gpu_only and len(shown) == len(set(shown))
    # each printed line is a command line that parses back to what ran
    assert f"$ torchtool evaluate {out / 'run' / 'best.pth'} --csv {out / 'report.csv'}" in result.stdout

    run = out / "run"
    assert (run / "curves.png").read_bytes()[:8] == PNG and (out / "confusion.png").read_bytes()[:8] == PNG
    with open(out / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows[:10]] == [str(d) for d in range(10)]
    assert sum(int(r["support"]) for r in rows[:10]) == sum(1 for _ in (out / "digits" / "val").rglob("*.png"))
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["crop_pct"] == 1.0
    assert f"$ {config['commands'][0]['command']}" in lines  # the line the demo printed is the one recorded
    n_photos = len(list((out / "photos").iterdir()))
    assert np.load(out / "features" / "gap.npy").shape == (n_photos, 512)
    logits = np.load(out / "features" / "logits.npy")
    assert logits.shape == (n_photos, 10) and np.isfinite(logits).all()
    videos = sorted((out / "videos").iterdir())
    for video in videos:
        assert len(list((out / "frames" / video.stem).glob("*.jpg"))) == 4  # TSN: 4 segments
    # the report: the accuracy reached, where each output is, what to try next
    assert "best_val_acc" in result.stdout and str(run / "curves.png") in result.stdout
    assert "torchtool finetune YOUR_DATA/" in result.stdout


def test_an_existing_out_is_refused_without_overwrite(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("keep me")
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (tmp_path / "demo" / "mine.txt").read_text() == "keep me"


def test_ctrl_c_says_where_the_demo_stopped(torchtool_exe, tmp_path):
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "demo"
    proc = subprocess.Popen([str(torchtool_exe), "demo", "--quick", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "run" / "config.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # finetune has started ...
    time.sleep(1.0)  # ... and its loader workers with it
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "torchtool: error: demo interrupted during finetune" in stderr and "Traceback" not in stderr
    assert (out / "digits").is_dir()  # what it made is left for a look
