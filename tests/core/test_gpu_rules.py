"""gpu-reset's safety rules, each against real processes (tests/gpu_standin.py stands in for NVML and /dev)."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import GENEROUS_S

from tests.gpu_standin import children, holding, named_sleep, prefix, standin, wait_for_comm  # noqa: F401
from torchtool.core import gpu
from torchtool.core.gpu import proc, reset


def _run(run_torchtool, env, *args) -> dict[int, dict]:
    done = run_torchtool("gpu-reset", *args, env=env)
    assert done.returncode == 0, done.stderr
    return {r["pid"]: r for r in json.loads(done.stdout)["processes"]}


def _kernel_threads() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != "2":
            fields = proc._stat(int(entry.name))
            if fields and int(fields[6]) & proc.PF_KTHREAD:
                found.append(int(entry.name))
    return found[:1]


def test_kernel_threads_are_never_targeted(tmp_path, children, run_torchtool):
    if proc.comm(2) != "kthreadd":
        pytest.skip("this PID namespace shows no kernel threads (a container)")
    worker = children(holding(tmp_path, "0"))
    assert proc.kernel_thread(2) and not proc.kernel_thread(os.getpid()) and not proc.kernel_thread(worker.pid)
    kthreads = [2, *_kernel_threads()]
    env = standin(tmp_path, [{"processes": [{"pid": pid, "used_bytes": 1} for pid in (*kthreads, worker.pid)]}])
    rows = _run(run_torchtool, env, "--yes", "--json", "--timeout", "5")
    for pid in kthreads:
        assert (rows[pid]["action"], rows[pid]["reason"], rows[pid]["result"]) == ("leave", "a kernel thread", None)
    assert rows[worker.pid]["result"] == "ended (SIGTERM)"  # the same run did end what it should


def test_driver_daemons_and_display_servers_are_never_ended(tmp_path, children, run_torchtool):
    """Named by /proc/PID/comm: copies of sleep run under the daemons' names, holding GPU 0's device."""
    with open(prefix(tmp_path) + "0") as device:
        named = {name: children(argv=named_sleep(tmp_path, name), stdin=device)
                 for name in ("nvidia-persistenced", "nv-fabricmanager", "nv-hostengine", "Xorg")}
    worker = children(holding(tmp_path, "0"))
    env = standin(tmp_path, [{"display": True, "processes": [{"pid": named["Xorg"].pid, "used_bytes": 1}]}])
    rows = _run(run_torchtool, env, "--yes", "--json", "--timeout", "5")
    for name, child in named.items():
        row = rows[child.pid]
        assert row["action"] == "leave" and row["result"] is None and child.poll() is None, row
        assert name in row["reason"] and "never ended" in row["reason"]
    assert "persistence daemon" in rows[named["nvidia-persistenced"].pid]["reason"]
    assert "display server" in rows[named["Xorg"].pid]["reason"]
    assert rows[worker.pid]["result"] == "ended (SIGTERM)"


def test_an_nvml_pid_must_hold_the_gpus_device_file(tmp_path, children, run_torchtool):
    """In a container NVML reports host PIDs: a local process with that number holds no /dev/nvidiaN."""
    unrelated, elsewhere = children(), children(holding(tmp_path, "0"))
    real = children(holding(tmp_path, "1"))
    # GPU 0 is /dev/nvidia1 (its minor number), GPU 1 is /dev/nvidia0
    env = standin(tmp_path, [{"minor": 1, "processes": [{"pid": p.pid, "used_bytes": 1} for p in
                                                          (unrelated, elsewhere, real)]}, {"minor": 0}])
    rows = _run(run_torchtool, env, "--yes", "--json", "--gpu", "0", "--timeout", "5")
    for child in (unrelated, elsewhere):
        row = rows[child.pid]
        assert row["action"] == "leave" and row["result"] is None and child.poll() is None
        assert row["reason"].startswith(f"NVML reports it, but /proc shows no {prefix(tmp_path)}1 open in it")
    assert rows[real.pid]["result"] == "ended (SIGTERM)"


def test_another_users_process_is_left_alone(tmp_path, children):
    """As a user that does not own the child (any euid will do: the rule compares uids)."""
    child = children(holding(tmp_path, "0"))
    row = gpu.Holder(0, child.pid, "cuda", 1)
    assert proc.describe_pid(row)
    someone_else = gpu.Rules(prefix(tmp_path), {0: 0}, me=row.uid + 1)
    assert someone_else.judge(row) == f"not yours (user {row.user}): only root may end it, with --all-users"
    assert gpu.Rules(prefix(tmp_path), {0: 0}, me=row.uid).judge(row) is None
    reset.end_holders([row], 5, someone_else)  # asked again before the signal
    assert row.result.startswith("not signalled: not yours") and child.poll() is None


def _plan(tmp_path, monkeypatch, *pids: int):
    monkeypatch.setenv(gpu.STANDIN_ENV, standin(tmp_path, [{"processes": [
        {"pid": pid, "used_bytes": 1} for pid in pids]}])[gpu.STANDIN_ENV])
    return gpu.plan(None, False, timeout=5)


def test_the_rules_are_asked_again_just_before_sigterm(tmp_path, children, monkeypatch):
    """Listed as a worker, then it exec'd nvidia-persistenced (same PID, same start time): not signalled."""
    argv = named_sleep(tmp_path, "nvidia-persistenced")
    child = children(holding(tmp_path, "0", code=f"import os; print('ready', flush=True); input(); os.execv("
                                                  f"{argv[0]!r}, {argv!r})"), stdin=-1)
    p = _plan(tmp_path, monkeypatch, child.pid)
    (row,) = [h for h in p.holders if h.pid == child.pid]
    assert row.action == "end"
    child.stdin.write("go\n")
    child.stdin.flush()
    wait_for_comm(child.pid, "nvidia-persistenced")
    reset.end_holders(p.holders, 5, p.rules)
    assert row.result.startswith("not signalled: the NVIDIA persistence daemon") and child.poll() is None


def test_a_process_listed_as_left_alone_is_never_signalled(tmp_path, children, monkeypatch):
    """It held no device file when listed (so it was shown as left alone); it opens one before the signals."""
    child = children(f"import time; print('ready', flush=True); input(); f = open({prefix(tmp_path)!r} + '0'); "
                     "print('opened', flush=True); time.sleep(120)", stdin=-1)
    p = _plan(tmp_path, monkeypatch, child.pid)
    (row,) = [h for h in p.holders if h.pid == child.pid]
    assert row.action == "leave" and "NVML reports it" in row.reason
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "opened"
    assert p.rules.judge(row) is None  # the rules alone would now allow it: what was shown is what counts
    reset.end_holders(p.holders, 5, p.rules)
    assert row.result is None and child.poll() is None


def test_without_pidfds_the_start_time_check_still_guards(tmp_path, children, monkeypatch):
    """Kernels before 5.3 have no pidfd_open: os.kill after the same checks."""
    def no_pidfds(pid):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    first, second = children(holding(tmp_path, "0")), children(holding(tmp_path, "0"))
    rows = [gpu.Holder(0, child.pid, "cuda", 1) for child in (first, second)]
    for row in rows:
        assert proc.describe_pid(row)
    rows[1].start_ticks -= 1000  # as if the PID had been given to another process since the listing
    reset.end_holders(rows, 5, gpu.Rules(prefix(tmp_path), {0: 0}))
    assert rows[0].result == "ended (SIGTERM)" and first.wait(GENEROUS_S) == -signal.SIGTERM
    assert rows[1].result == reset.RECYCLED and second.poll() is None
