"""Atomic file writes and the refuse-to-overwrite rule: every file torchtool writes goes through here.

A temporary file beside the target, the mode ``open()`` would give, fsync, ``os.replace``;
on any exception (Ctrl-C included) the temporary file is removed and the old file kept.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchtool.core.output import UsageError

def _file_mode(path: Path) -> int:
    """An existing file's permissions, else the umask's default for a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it.

    If the body raises, the temporary file is removed and any previous ``path`` is left
    untouched, so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give what open() would
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """``open()`` whose result appears at ``path`` only if the body finishes."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_save(path: str | os.PathLike, writer: Any) -> None:
    """Atomically write a file produced by ``writer(tmp_path)`` (torch.save, savefig, ...)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` was given."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists", hint="pass --overwrite to replace it")
    return path
