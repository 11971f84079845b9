"""finetune as processes: the run lock (in-process and under torchrun), SIGKILL and resume, torchrun itself.

Each waits on an event (a file appearing, a process ending), never on a fixed sleep: they pass on a busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.commands.test_finetune import SMALL, invoke, runner
from tests.conftest import GENEROUS_S
from torchtool.cli import app
from torchtool.core.models.checkpoint import load_checkpoint


def test_a_folder_another_run_holds_is_refused(digits4, tmp_path):
    import multiprocessing

    out = tmp_path / "run"
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(GENEROUS_S)
        refused = invoke(digits4, "--out", out, *SMALL, "--resume")
        assert refused.exit_code == 1 and f"{out} is in use by another torchtool run (pid {holder.pid})" in refused.stderr
        assert not (out / "last.pth").exists()
    finally:
        release.set()
        holder.join(GENEROUS_S)
    assert invoke(digits4, "--out", out, *SMALL, "--resume").exit_code == 0  # released: the run goes ahead


def test_a_torchrun_run_holds_its_folder_against_a_second_run(spawn, wait_for, digits4, tmp_path):
    from torchtool.core.files import LOCK_NAME

    out = tmp_path / "run"
    # long enough to outlive the test (the fixture kills it): the refusal below is against a live run
    proc = spawn(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                 "torchtool", "finetune", digits4, "--out", out, *SMALL, "--epochs", "1000",
                 env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    wait_for("the run's config.json", (out / "config.json").is_file, proc)  # written once the run is set up
    refused = invoke(digits4, "--out", out, *SMALL, "--resume")
    assert refused.exit_code == 1, refused.output
    holder = int((out / LOCK_NAME).read_text())
    assert f"{out} is in use by another torchtool run (pid {holder})" in refused.stderr
    assert _parent(holder) == proc.pid and proc.poll() is None  # held by a rank torchrun started, still running


def _parent(pid: int) -> int:
    """The parent of process ``pid``, from /proc (the field after the parenthesised name)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _hold(out, ready, release) -> None:
    from torchtool.core.files import run_lock

    with run_lock(out):
        ready.set()
        release.wait(GENEROUS_S)  # released by the test, however long its refused run took


def test_resume_after_sigkill_matches_an_uninterrupted_run(torchtool_exe, spawn, wait_for, digits4, tmp_path):
    args = [str(digits4), *SMALL[:-1], "--epochs", "3", "--deterministic", "--augment", "light", "--mixup", "0.2",
            "--ema", "0.9", "--quiet"]
    straight = runner.invoke(app, ["finetune", *args, "--out", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output

    out = tmp_path / "killed"
    proc = spawn(torchtool_exe, "finetune", *args, "--out", out)
    # last.pth is written whole or not at all (atomic): once it is there, epoch 1 is on disk
    wait_for("epoch 1's last.pth", (out / "last.pth").is_file, proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed by the signal, not finished on its own
    killed_at = load_checkpoint(out / "last.pth")["epoch"]
    assert 1 <= killed_at < 3  # before the last epoch: the resume has epochs left to get right

    resumed = runner.invoke(app, ["finetune", *args, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = load_checkpoint(tmp_path / "straight" / "last.pth"), load_checkpoint(out / "last.pth")
    assert b["epoch"] == 3
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert a["ema"].keys() == b["ema"].keys() and all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]
    assert [r["ema_val_acc"] for r in a["history"]] == [r["ema_val_acc"] for r in b["history"]]
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_the_same_global_batch(run_python, digits4, tmp_path,
                                                                     resnet18_weights_pth):
    common = [str(digits4), "--model", "resnet18", "--weights", str(resnet18_weights_pth), "--image-size", "32",
              "--workers", "0", "--augment", "light", "--epochs", "2", "--freeze-backbone", "--lr", "0.05",
              "--device", "cpu", "--json"]
    env = {"OMP_NUM_THREADS": "1"}
    ddp = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torchtool",
                     "finetune", *common, "--batch-size", "8", "--out", str(tmp_path / "ddp"),
                     env={**env, "TMPDIR": str(tmp_path)}, timeout=GENEROUS_S)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_python("-m", "torchtool", "finetune", *common, "--batch-size", "16", "--out", str(tmp_path / "one"),
                     env=env, timeout=GENEROUS_S)
    assert one.returncode == 0, one.stderr[-3000:]
    s_ddp, s_one = json.loads(ddp.stdout), json.loads(one.stdout)  # one summary: only rank 0 prints
    assert s_ddp["train_images"] == s_one["train_images"] == 64
    assert ddp.stderr.count("epoch 2/2") == 1  # only rank 0 logs
    a, b = load_checkpoint(tmp_path / "ddp" / "last.pth"), load_checkpoint(tmp_path / "one" / "last.pth")
    assert len(a["rng"]) == 2 and len(b["rng"]) == 1
    for key in ("fc.weight", "fc.bias"):
        assert torch.allclose(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-6), key
    for row_a, row_b in zip(a["history"], b["history"]):
        for col in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert row_a[col] == pytest.approx(row_b[col], rel=1e-4), col


def test_sync_bn_on_cpu_under_torchrun_is_refused(run_python, digits4, tmp_path):
    proc = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torchtool",
                      "finetune", str(digits4), "--out", str(tmp_path / "run"), *SMALL, "--sync-bn",
                      env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}, timeout=GENEROUS_S)
    assert proc.returncode != 0
    assert "--sync-bn needs CUDA" in proc.stderr and not (tmp_path / "run" / "last.pth").exists()
