"""Generate the bash, zsh and fish completion scripts for ``torchtool``.

    python completions/generate.py [OUT_DIR]     # default: this folder

The scripts are exactly what Typer prints for ``torchtool --show-completion SHELL``:
each one calls back into ``torchtool`` (``_TORCHTOOL_COMPLETE=complete_bash`` ...), so
they never go stale when commands or options change; regenerate them only when Typer's
templates change (tests/test_completions.py tells you when).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# shell -> file name each shell's completion loader expects
FILES = {
    "bash": "torchtool.bash",
    "zsh": "_torchtool",
    "fish": "torchtool.fish",
}


def completion_script(shell: str) -> str:
    """Typer's completion script for ``shell``, for the program name ``torchtool``."""
    env = dict(os.environ)
    # Without this Typer guesses the shell from the parent process and --show-completion
    # takes no value; with it, --show-completion SHELL names the shell, so the output
    # does not depend on which shell runs this script.
    env["_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"] = "1"
    env.pop("_TORCHTOOL_COMPLETE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torchtool", "--show-completion", shell],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"generate.py: 'torchtool --show-completion {shell}' failed "
                         f"(exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.rstrip("\n") + "\n"


def generate(out_dir: str | os.PathLike = HERE) -> list[Path]:
    """Write one completion script per shell into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in FILES.items():
        path = out / name
        path.write_text(completion_script(shell), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str]) -> None:
    usage = "usage: python completions/generate.py [OUT_DIR]"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    if len(argv) > 1:
        raise SystemExit(usage)
    for path in generate(argv[0] if argv else HERE):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
