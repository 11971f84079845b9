"""Claim: `torchtool env-info --format json` is faster than `python -m torch.utils.collect_env`.

    python benchmarks/env_info.py [RUNS]

Both run as fresh processes, interleaved; prints medians and their ratio.
"""

from __future__ import annotations

import sys

from _timing import compare, report, torchtool_exe

GOAL = 1.0


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    ours_cmd = [torchtool_exe(), "env-info", "--format", "json"]
    base_cmd = [sys.executable, "-m", "torch.utils.collect_env"]
    ours, base = compare(ours_cmd, base_cmd, runs)
    report("env-info: torchtool env-info --format json vs python -m torch.utils.collect_env",
           "torchtool env-info --format json", ours, "python -m torch.utils.collect_env", base, GOAL)


if __name__ == "__main__":
    main()
