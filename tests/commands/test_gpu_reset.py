"""torchtool gpu-reset against real child processes that the NVML stand-in reports as GPU users.

This machine has no NVIDIA driver: ``TORCHTOOL_GPU_STANDIN`` names a JSON description of
GPUs whose processes are the children started here, and the children hold stand-ins for the
/dev/nvidia* files (tests/gpu_standin.py), so the listing, the safety rules, the start-time
guard and SIGTERM/SIGKILL run for real. The real NVML path runs in benchmarks/gpu_check.py
on a GPU machine. The rules one by one: tests/core/test_gpu_rules.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import GENEROUS_S

from tests.gpu_standin import IGNORES_TERM, children, holding, named_sleep, prefix, standin  # noqa: F401 (fixture)
from torchtool.core import gpu


def _run(run_torchtool, env, *args):
    proc = run_torchtool("gpu-reset", *args, env=env)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None)


def test_dry_run_lists_and_changes_nothing(tmp_path, children, run_torchtool):
    a, b = children(holding(tmp_path, "0")), children(holding(tmp_path, "1", code=IGNORES_TERM))
    env = standin(tmp_path, [
        {"name": "Stand-in A100", "base_bytes": 10 ** 9, "processes": [
            {"pid": a.pid, "used_bytes": 3 * 10 ** 9}, {"pid": "self", "used_bytes": 1},
            {"pid": "parent", "used_bytes": 1}, {"pid": 1, "used_bytes": 1}]},
        {"name": "Stand-in A100", "processes": [{"pid": b.pid, "used_bytes": 10 ** 9}]}])
    proc, report = _run(run_torchtool, env, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["gpu"], r["pid"]): r for r in report["processes"]}
    mine = rows[(0, a.pid)]
    assert mine["action"] == "end" and mine["kind"] == "cuda" and mine["memory_bytes"] == 3 * 10 ** 9
    assert mine["user"] == __import__("pwd").getpwuid(os.geteuid()).pw_name
    assert "time.sleep(3600)" in mine["command"] and mine["started"].startswith(time.strftime("%Y-"))
    assert rows[(0, 1)]["reason"] == "PID 1 (init)" and rows[(0, os.getpid())]["reason"] == "a parent of torchtool"
    assert [r["reason"] for r in report["processes"] if r["action"] == "leave" and r["pid"] not in (1, os.getpid())
            ] == ["torchtool itself"]
    assert rows[(1, b.pid)]["action"] == "end" and report["gpus"] is None
    assert a.poll() is None and b.poll() is None  # nothing was signalled
    only = _run(run_torchtool, env, "--dry-run", "--json", "--gpu", "1")[1]
    assert [r["pid"] for r in only["processes"]] == [b.pid]
    table = run_torchtool("gpu-reset", "--dry-run", env=env).stdout
    assert "3.0 GB" in table and "torchtool itself" in table


def test_without_a_terminal_it_refuses_to_act(tmp_path, children, run_torchtool):
    a = children(holding(tmp_path, "0"))
    env = standin(tmp_path, [{"processes": [{"pid": a.pid, "used_bytes": 10}]}])
    proc, _ = _run(run_torchtool, env)
    assert proc.returncode == 2 and "no terminal to confirm on" in proc.stderr and str(a.pid) in proc.stdout
    assert a.poll() is None


def test_sigterm_then_sigkill_and_memory_freed(tmp_path, children, run_torchtool):
    polite, stubborn = children(holding(tmp_path, "0")), children(holding(tmp_path, "0", code=IGNORES_TERM))
    env = standin(tmp_path, [{"name": "Stand-in", "base_bytes": 500, "processes": [
        {"pid": polite.pid, "used_bytes": 2000}, {"pid": stubborn.pid, "used_bytes": 7000},
        {"pid": "self", "used_bytes": 0}]}])
    started = time.monotonic()
    proc, report = _run(run_torchtool, env, "--yes", "--timeout", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    results = {r["pid"]: r["result"] for r in report["processes"]}
    assert results[polite.pid] == "ended (SIGTERM)" and results[stubborn.pid] == "killed (SIGKILL)"
    assert polite.wait(GENEROUS_S) == -signal.SIGTERM and stubborn.wait(GENEROUS_S) == -signal.SIGKILL
    assert time.monotonic() - started >= 1  # the survivor got its --timeout before SIGKILL
    (summary,) = report["gpus"]
    assert summary["used_before_bytes"] == 9500 and summary["used_after_bytes"] == 500
    assert summary["freed_bytes"] == 9000 and summary["reset"] is None


def test_a_recycled_pid_is_never_signalled(tmp_path, children, run_torchtool):
    a = children(holding(tmp_path, "0"))
    real = gpu.proc_start_ticks(a.pid)
    # the listing believes another start time: the process it saw is gone and the PID was given to this one
    env = standin(tmp_path, [{"processes": [{"pid": a.pid, "used_bytes": 10, "start_ticks": real - 1000}]}])
    proc, report = _run(run_torchtool, env, "--yes", "--timeout", "0.2", "--json")
    assert report["processes"][0]["result"] == "not signalled: the PID now belongs to another process (recycled)"
    time.sleep(0.3)
    assert a.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another user needs root")
def test_another_users_process_needs_all_users(tmp_path, children, run_torchtool):
    with open(prefix(tmp_path) + "0") as device:  # another user may not read this interpreter: a plain sleep
        other = children(argv=["sleep", "120"], user=65534, stdin=device)  # nobody, holding the device
    env = standin(tmp_path, [{"processes": [{"pid": other.pid, "used_bytes": 10}]}])
    proc, report = _run(run_torchtool, env, "--yes", "--json")
    row = report["processes"][0]
    assert row["action"] == "leave" and row["reason"].startswith("not yours (user nobody)") and row["result"] is None
    assert other.poll() is None
    proc, report = _run(run_torchtool, env, "--yes", "--all-users", "--timeout", "1", "--json", "--reset")
    assert report["processes"][0]["result"] == "ended (SIGTERM)"
    assert report["gpus"][0]["processes_left"] == 0
    assert report["gpus"][0]["reset"] == "not reset: nvidia-smi is not installed" or shutil_which_nvidia()
    assert proc.returncode == 1  # --reset asked for and not done


def shutil_which_nvidia() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


def test_device_files_without_a_context_are_listed(tmp_path, children, run_torchtool):
    holder = children(holding(tmp_path, "0", "ctl"))
    other_gpu = children(holding(tmp_path, "1"))
    env = standin(tmp_path, [{"processes": []}, {"processes": []}])
    ctl_only = children(holding(tmp_path, "ctl", "-uvm"))
    report = _run(run_torchtool, env, "--dry-run", "--json", "--gpu", "0")[1]
    rows = [(r["gpu"], r["pid"], r["kind"]) for r in report["processes"]]
    assert rows == [(0, holder.pid, "device file")]  # one row; not GPU 1's holder, not a ctl-only one
    assert "without a CUDA context" in report["processes"][0]["reason"]
    every = _run(run_torchtool, env, "--dry-run", "--json")[1]
    assert sorted((r["gpu"] if r["gpu"] is not None else -1, r["pid"], r["action"]) for r in every["processes"]) == \
        sorted([(-1, ctl_only.pid, "leave"), (0, holder.pid, "end"), (1, other_gpu.pid, "end")])


def test_monitors_and_control_devices_only_with_include_control(tmp_path, children, run_torchtool):
    """A process holding only nvidiactl/nvidia-uvm, or named like a monitor, is listed and left unless
    --include-control."""
    monitor, worker = children(holding(tmp_path, "ctl", "-uvm")), children(holding(tmp_path, "0", "ctl"))
    with open(prefix(tmp_path) + "0") as device:
        nvtop = children(argv=named_sleep(tmp_path, "nvtop"), stdin=device)
    env = standin(tmp_path, [{"processes": []}])
    proc, report = _run(run_torchtool, env, "--yes", "--json", "--timeout", "5")
    rows = {r["pid"]: r for r in report["processes"]}
    assert rows[monitor.pid]["action"] == "leave" and rows[monitor.pid]["gpu"] is None
    assert rows[monitor.pid]["reason"].startswith("holds only control devices") and rows[monitor.pid]["result"] is None
    assert rows[nvtop.pid]["reason"] == "a GPU monitor (nvtop): pass --include-control to end it"
    assert rows[worker.pid]["result"] == "ended (SIGTERM)" and worker.wait(GENEROUS_S) == -signal.SIGTERM
    assert monitor.poll() is None and nvtop.poll() is None
    proc, report = _run(run_torchtool, env, "--yes", "--json", "--timeout", "5", "--include-control")
    assert {(r["pid"], r["action"], r["result"]) for r in report["processes"]} == {
        (monitor.pid, "end", "ended (SIGTERM)"), (nvtop.pid, "end", "ended (SIGTERM)")}
    assert monitor.wait(GENEROUS_S) == -signal.SIGTERM and nvtop.wait(GENEROUS_S) == -signal.SIGTERM


def test_the_whole_parent_chain_is_protected(tmp_path, children, torchtool_exe):
    """Run from a grandchild of a process that holds the GPU: that grandparent is never signalled."""
    sibling = children(holding(tmp_path, "0"))
    env = os.environ | standin(tmp_path, [{"processes": [{"pid": "parent", "used_bytes": 1}]}])
    middle = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    grandparent = holding(tmp_path, "0", code=(
        "import subprocess, sys; "
        f"sys.exit(subprocess.run([sys.executable, '-c', {middle!r}, {str(torchtool_exe)!r}, 'gpu-reset', '--yes', "
        "'--json', '--timeout', '5']).returncode)"))
    top = subprocess.Popen([sys.executable, "-c", grandparent], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = top.communicate(timeout=GENEROUS_S)
    assert top.returncode == 0, out  # not ended: it exited on its own, with gpu-reset's status
    rows = {r["pid"]: r for r in json.loads(out)["processes"]}
    assert rows[top.pid]["action"] == "leave" and rows[top.pid]["reason"] == "a parent of torchtool"
    (middle_row,) = [r for r in rows.values() if r["kind"] == "cuda"]
    assert middle_row["reason"] == "a parent of torchtool" and middle_row["result"] is None
    assert rows[sibling.pid]["result"] == "ended (SIGTERM)"  # it did act, on what was not its parent


@pytest.mark.parametrize("value", ["601", "-1", "nan", "inf"])
def test_timeout_is_bounded(tmp_path, run_torchtool, value):
    proc = run_torchtool("gpu-reset", "--dry-run", "--timeout", value, env=standin(tmp_path, [{"processes": []}]))
    assert proc.returncode == 2 and proc.stderr.startswith("torchtool: error: --timeout ")
    assert "give 0 to 600 seconds" in proc.stderr and len(proc.stderr.splitlines()) == 2  # the line and its hint


def test_reset_says_why_not(monkeypatch):
    idle = gpu.Gpu(0, "Stand-in", 0)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert gpu.reset_gpu(idle, 0) == "not reset: not root (nvidia-smi --gpu-reset needs root)"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert gpu.reset_gpu(idle, 2) == "not reset: 2 process(es) still hold it"
    assert gpu.reset_gpu(gpu.Gpu(0, "x", 0, mig=True, display=True), 0) == \
        "not reset: MIG is enabled on it; it drives a display"


def test_no_driver_is_one_line_and_no_torch(run_python):
    code = ("import sys\nfrom torchtool.cli import main\ntry:\n    main(['gpu-reset', '--dry-run'])\n"
            "except SystemExit as e:\n    print('exit', e.code)\nprint('torch' in sys.modules)")
    proc = run_python("-c", code, env={gpu.STANDIN_ENV: ""})
    if "exit 0" in proc.stdout:
        pytest.skip("this machine has an NVIDIA driver")
    assert proc.stdout.split() == ["exit", "1", "False"], proc.stdout + proc.stderr
    assert proc.stderr.startswith("torchtool: error: no NVIDIA driver or NVML library here")
    assert "Traceback" not in proc.stderr


def test_no_driver_with_json_still_prints_a_json_object(run_torchtool):
    proc = run_torchtool("gpu-reset", "--dry-run", "--json", env={gpu.STANDIN_ENV: ""})
    if proc.returncode == 0:
        pytest.skip("this machine has an NVIDIA driver")
    assert proc.returncode == 1 and proc.stderr.startswith("torchtool: error: no NVIDIA driver")
    report = json.loads(proc.stdout)
    assert report["processes"] == [] and report["gpus"] is None and "no NVIDIA driver" in report["error"]


def test_unknown_gpu_and_all_users_without_root(tmp_path, run_torchtool):
    env = standin(tmp_path, [{"processes": []}])
    proc, _ = _run(run_torchtool, env, "--gpu", "3", "--dry-run")
    assert proc.returncode == 2 and "--gpu 3: there is no such GPU" in proc.stderr and "GPUs here: 0" in proc.stderr


def test_a_process_on_two_gpus_is_signalled_once(tmp_path, children, monkeypatch):
    from torchtool.core.gpu import reset

    child = children(holding(tmp_path, "0", "1"))
    rows = [gpu.Holder(i, child.pid, "cuda", 10) for i in (0, 1)]
    for row in rows:
        assert gpu.proc.describe_pid(row)
    sent = []
    real_send = signal.pidfd_send_signal
    monkeypatch.setattr(signal, "pidfd_send_signal", lambda fd, sig: (sent.append(sig), real_send(fd, sig)))
    reset.end_holders(rows, 3, gpu.Rules(prefix(tmp_path), {0: 0, 1: 1}))
    assert sent == [signal.SIGTERM]  # signals pending at once would merge: count the calls
    assert [r.result for r in rows] == ["ended (SIGTERM)"] * 2
