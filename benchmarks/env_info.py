"""Claim: `torchtool env-info --format json` is faster than `python -m torch.utils.collect_env`.

    python benchmarks/env_info.py [RUNS]

Both run as fresh processes, interleaved (RUNS rounds, default 5, after one warm-up each;
~1 minute on 2 cores); prints medians and their ratio. Then, under the figures, what each
one does, so the ratio is read for what it is: one more run of each with subprocess.Popen
and os.system wrapped lists every command it starts and the seconds spent in it (less
those `import torch` itself starts, which both pay).
torch.utils.collect_env shells out for most of its facts (on Linux: `python -mpip list
--format=freeze`, `conda list`, `nvcc --version`, `nvidia-smi -L`, `nvidia-smi`,
`ldconfig -p | grep libcudnn ...`, `lsb_release -a` (or `cat /etc/*-release`), `gcc`,
`clang` and `cmake --version`, `lscpu`), and reports things env-info does not (compiler
versions, nvcc, every matching pip/conda package). torchtool reads package metadata
(importlib.metadata, a fixed list of packages), /proc/cpuinfo, /etc/os-release, torch's
build info and NVML (nvidia-ml-py) in-process, with no subprocess, and its console script
skips the interpreter's teardown of torch (os._exit) that collect_env pays.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from _timing import compare, report, torchtool_exe

GOAL = 1.0

# Runs TARGET with every subprocess.Popen (subprocess.run goes through it) and os.system
# recorded: the command line and, when it was waited for with communicate(), its seconds.
_TRACE = r"""
import json, os, subprocess, sys, time
calls = []
_init, _communicate, _system = subprocess.Popen.__init__, subprocess.Popen.communicate, os.system

def init(self, args, *a, **kw):
    self._bench_call = {"cmd": args if isinstance(args, str) else " ".join(map(str, args)), "t0": time.perf_counter()}
    calls.append(self._bench_call)
    _init(self, args, *a, **kw)

def communicate(self, *a, **kw):
    try:
        return _communicate(self, *a, **kw)
    finally:
        self._bench_call["seconds"] = time.perf_counter() - self._bench_call["t0"]

def system(cmd):
    calls.append({"cmd": cmd})
    return _system(cmd)

subprocess.Popen.__init__, subprocess.Popen.communicate, os.system = init, communicate, system
t0 = time.perf_counter()
try:
    TARGET
finally:
    with open(os.environ["TRACE_OUT"], "w") as f:
        json.dump({"seconds": time.perf_counter() - t0, "calls": calls}, f)
"""
_TARGETS = {  # label -> the statement that does what the timed command does, in-process
    "python -m torch.utils.collect_env":
        "import runpy; runpy.run_module('torch.utils.collect_env', run_name='__main__')",
    "torchtool env-info --format json":
        "from torchtool.cli import main; main(['env-info', '--format', 'json'])",
}


def trace(target: str) -> dict:
    """The commands one in-process run of ``target`` starts (see _TRACE)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trace.json")
        subprocess.run([sys.executable, "-c", _TRACE.replace("TARGET", target)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={**os.environ, "TRACE_OUT": out}, check=False)
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def describe(gap: float) -> None:
    """What each command does; ``gap``: collect_env's median minus torchtool's, in seconds."""
    print("what each does (one more run of each, subprocess.Popen and os.system wrapped):")
    waited = 0.0
    by_import = [c["cmd"] for c in trace("import torch")["calls"]]  # paid by both, before any of their own work
    for label, target in _TARGETS.items():
        rec = trace(target)
        calls = [c for c in rec["calls"] if c["cmd"] not in by_import]
        inside = sum(c.get("seconds", 0.0) for c in calls)
        waited = max(waited, inside)
        if not calls:
            print(f"  {label}: no subprocess of its own ({rec['seconds']:.2f} s in all, interpreter start excluded)")
            continue
        print(f"  {label}: {len(calls)} subprocesses of its own, {inside:.2f} s of its {rec['seconds']:.2f} s "
              f"(interpreter start excluded) waiting on them:")
        for c in calls:
            seconds = f"{c['seconds']:6.2f} s" if "seconds" in c else "     ? s"
            print(f"    {seconds}  {c['cmd'][:110]}")
    if by_import:
        print(f"  both: `import torch` itself starts {', '.join(by_import)} (ctypes.util.find_library)")
    print("  collect_env: pip list / conda list for package versions, nvcc, nvidia-smi for GPUs and the driver,\n"
          "    ldconfig for cuDNN files, lsb_release for the OS, gcc/clang/cmake versions, lscpu for the CPU\n"
          "    (a tool that is not installed still costs a shell); it reports more than env-info does\n"
          "    (compilers, nvcc, every matching pip/conda package).\n"
          "  torchtool env-info: package metadata (importlib.metadata, a fixed list), /proc/cpuinfo,\n"
          "    /etc/os-release, torch's build info and NVML (nvidia-ml-py) read in-process, no subprocess.\n"
          "  torchtool's console script also leaves with os._exit once torch is imported, skipping the\n"
          "    interpreter's teardown of torch (see benchmarks/startup.py) that collect_env pays.")
    print(f"  of the {gap:.2f} s between the medians, {waited:.2f} s is collect_env waiting on its subprocesses; "
          "the rest is its teardown (skipped by torchtool) and its other in-process probes")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    ours_cmd = [torchtool_exe(), "env-info", "--format", "json"]
    base_cmd = [sys.executable, "-m", "torch.utils.collect_env"]
    ours, base = compare(ours_cmd, base_cmd, runs=runs)
    met = report("env-info: torchtool env-info --format json vs python -m torch.utils.collect_env",
                 "torchtool env-info --format json", ours, "python -m torch.utils.collect_env", base, GOAL)
    describe(statistics.median(base) - statistics.median(ours))
    raise SystemExit(0 if met else 1)  # a goal NOT met fails the run


if __name__ == "__main__":
    main()
