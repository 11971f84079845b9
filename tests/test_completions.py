"""The committed completion scripts are what completions/generate.py makes today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS = ROOT / "completions"
FILES = ("torchtool.bash", "_torchtool", "torchtool.fish")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("completions")
    proc = subprocess.run([sys.executable, str(COMPLETIONS / "generate.py"), str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("name", FILES)
def test_committed_completions_are_current(generated, name):
    fresh = (generated / name).read_text(encoding="utf-8")
    committed = COMPLETIONS / name
    assert committed.exists(), f"{committed} is missing: run python completions/generate.py"
    assert committed.read_text(encoding="utf-8") == fresh, (
        f"{committed} is stale: run python completions/generate.py")


@pytest.mark.parametrize(("name", "marker"), [("torchtool.bash", "_TORCHTOOL_COMPLETE=complete_bash"),
                                              ("_torchtool", "#compdef torchtool"),
                                              ("torchtool.fish", "_TORCHTOOL_COMPLETE=complete_fish")])
def test_scripts_call_back_into_torchtool(name, marker):
    assert marker in (COMPLETIONS / name).read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_script_completes_commands_in_bash():
    bin_dir = Path(sys.executable).parent
    script = ('source completions/torchtool.bash; COMP_WORDS=(torchtool env); COMP_CWORD=1; '
              '_torchtool_completion torchtool; printf "%s\\n" "${COMPREPLY[@]}"')
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["env-info"]
