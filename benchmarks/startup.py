"""Claim: `torchtool --help` starts at least 4x faster than `import torch` alone.

    python benchmarks/startup.py [RUNS]

Times the installed console script against `python -c "import torch"`, both as fresh
processes, interleaved; prints medians and their ratio.
"""

from __future__ import annotations

import sys

from _timing import compare, report, torchtool_exe

GOAL = 4.0


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    ours_cmd = [torchtool_exe(), "--help"]
    base_cmd = [sys.executable, "-c", "import torch"]
    ours, base = compare(ours_cmd, base_cmd, runs)
    report("startup: torchtool --help vs python -c 'import torch'",
           "torchtool --help", ours, "python -c 'import torch'", base, GOAL)


if __name__ == "__main__":
    main()
