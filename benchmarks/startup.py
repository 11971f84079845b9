"""Claim: `torchtool --help` starts at least 4x faster than `import torch` alone.

    python benchmarks/startup.py [RUNS]

Times three fresh processes, interleaved (RUNS rounds, default 7, after one warm-up each;
~40 s on 2 cores): the installed console script `torchtool --help`, which never imports
torch and exits normally, against two baselines:

- `python -c "import torch"`: the import plus the interpreter's teardown of torch's
  modules (~1 s on 2 cores), which every ordinary script that imports torch pays;
- `python -c "import torch, os; os._exit(0)"`: the import alone, teardown skipped.

Prints the medians and both ratios. The goal is judged on the stricter one, against the
import alone, so that no part of the 4x comes from the baseline's teardown.
"""

from __future__ import annotations

import sys

from _timing import compare, report_many, torchtool_exe

GOAL = 4.0


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    ours_cmd = [torchtool_exe(), "--help"]
    bare_cmd = [sys.executable, "-c", "import torch, os; os._exit(0)"]
    full_cmd = [sys.executable, "-c", "import torch"]
    ours, bare, full = compare(ours_cmd, bare_cmd, full_cmd, runs=runs)
    met = report_many("startup: torchtool --help vs python -c 'import torch' (with and without teardown)",
                "torchtool --help", ours,
                [("python -c 'import torch, os; os._exit(0)'", bare, "import alone, no teardown (the strict ratio)"),
                 ("python -c 'import torch'", full, "import plus interpreter teardown")],
                GOAL, judged_on=0)
    raise SystemExit(0 if met else 1)  # a goal NOT met fails the run


if __name__ == "__main__":
    main()
