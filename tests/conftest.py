"""Shared test helpers: the installed ``torchtool`` executable, run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHTOOL_DEBUG" and not k.startswith("_TORCHTOOL")}
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def torchtool_exe() -> Path:
    """The console script pip installed next to this interpreter."""
    exe = Path(sys.executable).with_name("torchtool")
    if not exe.exists():
        pytest.fail(f"{exe} not found: install the package first (pip install -e '.[test]')")
    return exe


@pytest.fixture(scope="session")
def run_torchtool(torchtool_exe: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``torchtool ARGS...`` end to end; returns the CompletedProcess (text mode)."""

    def run(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120):
        return subprocess.run([str(torchtool_exe), *args], capture_output=True, text=True,
                              env=_clean_env(env), timeout=timeout, check=False)

    return run


@pytest.fixture(scope="session")
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python ARGS...`` with this interpreter; returns the CompletedProcess (text mode)."""

    def run(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=_clean_env(env), timeout=timeout, check=False)

    return run
