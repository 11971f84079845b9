"""torchtool demo --quick end to end: every command runs, each output exists and is well-formed."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from torchtool.cli import COMMANDS, app
from torchtool.core.output import UsageError

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
        assert len(list((out / "frames" / video.name).glob("*.jpg"))) == 4  # TSN: 4 segments, one folder a video
    # the report: the accuracy reached, where each output is, what to try next
    assert "best_val_acc" in result.stdout and str(run / "curves.png") in result.stdout
    assert "torchtool finetune YOUR_DATA/" in result.stdout


def test_a_folder_the_demo_did_not_make_is_refused_even_with_overwrite(tmp_path):
    project = tmp_path / "proj"
    for name in ("photos", "videos", "run"):
        (project / name).mkdir(parents=True)
        (project / name / "mine.txt").write_text("keep me")
    (project / "report.csv").write_text("my,report\n")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["demo", "--quick", "--out", str(project), *extra])
        assert result.exit_code == 2 and "was not made by torchtool demo" in result.stderr, result.stderr
        assert "--overwrite" not in result.stderr  # it must not suggest the flag that would not help
    assert sorted(p.name for p in project.iterdir()) == ["photos", "report.csv", "run", "videos"]
    assert all((project / name / "mine.txt").read_text() == "keep me" for name in ("photos", "videos", "run"))
    assert (project / "report.csv").read_text() == "my,report\n"


def test_overwrite_removes_only_what_the_demo_made(tmp_path):
    from torchtool.core import demo

    out = demo.prepare_out(tmp_path / "demo", overwrite=False)  # the manifest comes first
    for name in ("digits", "run", "frames"):
        (out / name / "sub").mkdir(parents=True)
    (out / "report.csv").write_text("demo's\n")
    (out / "notes.txt").write_text("mine")  # the user's own file beside the demo's
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious.txt").write_text("keep")
    (out / "features").symlink_to(tmp_path / "elsewhere")  # a link in the demo's place: removed, not followed
    with pytest.raises(UsageError, match="already holds a demo"):
        demo.prepare_out(out, overwrite=False)
    demo.prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [demo.MANIFEST, "notes.txt"]
    assert (tmp_path / "elsewhere" / "precious.txt").read_text() == "keep"


def test_a_demo_name_made_by_someone_else_is_refused(tmp_path):
    import json as _json

    from torchtool.core import demo

    out = demo.prepare_out(tmp_path / "demo", overwrite=False)
    (tmp_path / "outside").mkdir()  # a sibling of --out, inside this test's own folder
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    (out / "notes.txt").write_text("mine")
    # edited by hand: only names of the demo's own count (never a path that leads elsewhere)
    (out / demo.MANIFEST).write_text(_json.dumps({"entries": ["run", "../outside", "notes.txt"]}))
    (out / "photos").mkdir()  # not in this manifest: someone else's
    (out / "photos" / "p.jpg").write_text("x")
    with pytest.raises(UsageError, match="photos was not made by the demo"):
        demo.prepare_out(out, overwrite=True)
    (out / "photos" / "p.jpg").unlink()
    (out / "photos").rmdir()
    (out / "run").mkdir()
    demo.prepare_out(out, overwrite=True)
    assert not (out / "run").exists()
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "outside" / "keep.txt").read_text() == "keep"


def test_ctrl_c_says_where_the_demo_stopped(torchtool_exe, tmp_path, wait_for):
    import os
    import signal
    import subprocess

    from tests.conftest import GENEROUS_S, _descendants

    out = tmp_path / "demo"
    proc = subprocess.Popen([str(torchtool_exe), "demo", "--quick", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    # finetune has started and its loader workers are running (a Ctrl-C while they fork can be swallowed)
    wait_for("finetune's loader workers", lambda: (out / "run" / "config.json").exists()
             and len(_descendants(proc.pid)) >= 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = proc.communicate(timeout=GENEROUS_S)
    assert proc.returncode == 130, stderr[-2000:]
    assert "torchtool: error: demo interrupted during finetune" in stderr and "Traceback" not in stderr
    assert (out / "digits").is_dir()  # what it made is left for a look
    restart = f"torchtool demo --out {out} --quick --overwrite"
    assert f"`{restart}` starts again" in stderr
    from torchtool.core import demo

    demo.prepare_out(out, overwrite=True)  # what the printed command does first: the interrupted demo is cleared
    assert sorted(p.name for p in out.iterdir()) == [demo.MANIFEST]
