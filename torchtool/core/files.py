"""Atomic file writes, output folders, disk space, and write errors in one line.

Every file torchtool writes goes through :func:`atomic_path` (a temporary file beside the
target, the mode ``open()`` would give, fsync, ``os.replace``; on any exception, Ctrl-C
included, the temporary file is removed and the old file kept) or, for row-by-row arrays,
reserves its space first (:func:`reserve`). A write that fails for a reason the user can
fix (a full disk, a quota, a read-only or forbidden folder) becomes one :class:`Failure`
line naming the path and the cause (:func:`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torchtool.core.output import Failure, TorchtoolError, UsageError

WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.ENAMETOOLONG: "file name too long"}
_FULL = 1 << 20  # below this much free space, a failed write is taken for a full disk
LOCK_NAME = ".torchtool.lock"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as df -H and file managers show them)."""
    units = ("B", "KB", "MB", "GB", "TB", "PB", "EB")
    for unit in units:
        if abs(n) < 1000 or unit == units[-1]:
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def walk_files(root: Path, wanted: Callable[[str], bool]) -> list[Path]:
    """Files under ``root`` whose name is ``wanted``: recursively, each folder's files sorted and then its
    sub-folders in sorted order; a symlink back into the tree (a cycle) is walked once."""
    found = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if wanted(f))
    return found


def read_path_list(lines: Iterable[str]) -> list[Path]:
    """Paths of a list file or stdin, one per line (blank lines skipped; any bytes, as surrogates)."""
    return [Path(line.rstrip("\r\n")) for line in lines if line.strip()]


def stdin_paths() -> list[Path]:
    """:func:`read_path_list` of stdin, read as bytes: file names need not be UTF-8."""
    import sys

    stdin = getattr(sys.stdin, "buffer", None)
    return read_path_list(os.fsdecode(line) for line in stdin) if stdin else read_path_list(sys.stdin)


def find_inputs(paths: Sequence[str], list_file: str | os.PathLike | None, wanted: Callable[[str], bool],
                what: str, extensions: Sequence[str]) -> list[tuple[Path, Path]]:
    """Command-line inputs in order as (file, the folder it was found under): a list file's paths first,
    then each of ``paths`` (a folder walked for ``wanted`` names, ``-`` for paths on stdin, a file).

    Paths named on the command line must exist; paths from lists are kept even when missing,
    so they show up as failed rows rather than silently vanishing. A file's folder is its parent.
    """
    found: list[tuple[Path, Path]] = []
    if list_file is not None:
        if not Path(list_file).is_file():
            raise UsageError(f"no such list file: {list_file}")
        with open(list_file, encoding="utf-8", errors="surrogateescape") as fh:  # any file name, byte for byte
            found += [(p, p.parent) for p in read_path_list(fh)]
    for raw in paths:
        path = Path(raw)
        if raw == "-":
            found += [(p, p.parent) for p in stdin_paths()]
        elif path.is_dir():
            found += [(p, path) for p in walk_files(path, wanted)]
        elif path.exists():
            found.append((path, path.parent))
        else:
            raise UsageError(f"no such file or directory: {raw}")
    if not found:
        raise UsageError(f"no {what} found in the inputs",
                         hint=f"looked for {', '.join(extensions)} files (case-insensitive)")
    return found


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged write may still use on ``folder``'s filesystem."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def write_error(exc: BaseException, path: str | os.PathLike) -> Failure | None:
    """The one-line :class:`Failure` for a write of ``path`` that failed for a reason a user can fix, else None.

    Knows OSError's errno, and the full disk behind other writers' errors (torch.save raises
    a RuntimeError from its zip writer).
    """
    cause = WRITE_ERRORS.get(exc.errno) if isinstance(exc, OSError) else None
    if cause is None and not isinstance(exc, (OSError, KeyboardInterrupt)):
        with contextlib.suppress(OSError):
            if free_bytes(Path(path).parent) < _FULL:
                cause = WRITE_ERRORS[errno.ENOSPC]
    if cause is None:
        return None
    hints = {"space": "free some space (or choose another --out), then rerun the same command",
             "quota": "free some space (or choose another --out), then rerun the same command",
             "large": "choose a folder on a file system that takes files this large",
             "name": "choose a shorter file name"}
    hint = next((h for word, h in hints.items() if word in cause), "choose an --out you can write to")
    return Failure(f"{cause} while writing {path}", hint=hint)


def writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check that ``path`` is (or can become) a folder this process can write in; nothing is created.

    Probes with a real temporary file in the nearest existing folder, so a read-only file
    system is found even for root (whom permission bits do not stop).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file", hint=f"give {what} a folder")
    error = _unwritable(path)
    if error:
        raise Failure(f"cannot write to {what} {path}: {error.message}", hint=f"choose a {what} you can write to")
    return path


def _unwritable(folder: Path) -> TorchtoolError | None:
    """Why no file can be made in ``folder`` (or the nearest existing folder above it), else None: a
    UsageError when a file stands where a folder should be, a Failure when the folder refuses writes."""
    probe = nearest_folder(folder)
    try:
        with tempfile.TemporaryFile(dir=probe):
            return None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return UsageError(f"{probe} is a file, not a folder")
        return Failure(WRITE_ERRORS.get(exc.errno, exc.strerror or type(exc).__name__))


def reserve(fd: int, size: int, path: str | os.PathLike) -> bool:
    """Allocate ``size`` bytes of the file behind ``fd`` now, so later writes cannot meet a full disk.

    False where the filesystem cannot preallocate (the file stays sparse); a full disk is a
    :class:`Failure` naming ``path``.
    """
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise write_error(exc, path) or exc from None


def check_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Fail before any work when ``folder`` has less than ``needed`` bytes free for ``what``."""
    free = free_bytes(folder)
    if needed > free:
        raise Failure(f"{folder} needs {human_bytes(needed)} for {what}, {human_bytes(free)} free",
                      hint="free some space or choose another --out, then rerun the same command")

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
    untouched, so readers never see a half-written file. Only regular files are replaced: a
    symbolic link's target is written (the link stays), a character device or FIFO is written
    through (the path itself is yielded), anything else is refused.
    """
    path = _target(Path(path))
    kind = _kind(path)
    if kind in ("folder", "other"):
        raise UsageError(f"{path} is not a regular file, a pipe or a terminal", hint="give a file name")
    if kind == "stream":
        try:
            yield path
        except BaseException as exc:
            raise write_error(exc, path) or exc from None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(exc, path) or exc from None
    os.close(fd)
    try:
        mode = _file_mode(path)
        os.chmod(tmp, mode)  # mkstemp makes 0600; give what open() would
        yield Path(tmp)
        os.chmod(tmp, mode)  # again: some writers (safetensors) replace the file they were given
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if _kind(path) in ("missing", "file"):  # checked again: something else may have appeared meanwhile
            os.replace(tmp, path)
        else:
            raise UsageError(f"{path} is no longer a regular file; not replaced")
    except BaseException as exc:
        failure = write_error(exc, path)  # before the unlink: a full disk is judged by the space left
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if failure is None:
            raise
        raise failure from exc


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """``open()`` whose result appears at ``path`` only if the body finishes."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh


def atomic_write_text(path: str | os.PathLike, text: str, errors: str = "strict") -> None:
    """Write a whole text file atomically, as UTF-8 (``errors="surrogateescape"``: file names' own bytes)."""
    with atomic_write(path, "w", encoding="utf-8", errors=errors) as fh:
        fh.write(text)


def atomic_save(path: str | os.PathLike, writer: Any) -> None:
    """Atomically write a file produced by ``writer(tmp_path)`` (torch.save, savefig, ...)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _kind(path: Path) -> str:
    """What sits at ``path`` after following links: 'missing', 'file', 'folder', 'stream' (a character
    device such as /dev/stdout's terminal or /dev/null, or a FIFO: written through), or 'other'."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a file where a folder should be: found by the folder check
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "stream" if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) else "other"


def is_stream(path: str | os.PathLike) -> bool:
    """A character device or FIFO (/dev/stdout, a named pipe): written through, whatever its name."""
    try:
        return _kind(Path(path)) == "stream"
    except OSError:
        return False


def _target(path: Path) -> Path:
    """Where a write to ``path`` lands: a symbolic link's final target (the link itself is never replaced)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _name_max(folder: Path) -> int:
    try:
        return os.statvfs(folder).f_namemax or 255
    except OSError:
        return 255


def _tmp_prefix(path: Path) -> str:
    """The temporary name's prefix for ``path``: ``.NAME.`` cut (in bytes) so that the name mkstemp
    makes (prefix + 8 random characters + ``.tmp``) fits the file system even when NAME barely does."""
    room = _name_max(path.parent) - len(".") - len(".") - 8 - len(".tmp")
    name = os.fsencode(path.name)[:max(room, 1)]
    return "." + os.fsdecode(name) + "."


def check_writable(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Everything that can be known about writing output ``path`` before a run starts; returns ``path``.

    Refused: an existing file without ``overwrite``; a folder, a block device or a socket; a name
    longer than the file system allows; a folder this process cannot create files in (probed with a
    real file, so a read-only mount stops root too). A symbolic link is judged by its target, which is
    what gets written; a character device or FIFO (``/dev/stdout``, ``/dev/null``, a named pipe) is
    written through, never replaced, so it needs no ``overwrite``.
    """
    path = Path(path).expanduser()
    shown = f"{what} {path}"
    limit = _name_max(nearest_folder(path.parent))
    if len(os.fsencode(path.name)) > limit:
        raise UsageError(f"{shown}: file name too long ({len(os.fsencode(path.name))} bytes; the file system "
                         f"allows {limit})", hint="choose a shorter file name")
    target = _target(path)
    kind = _kind(target)
    if kind == "folder":
        raise UsageError(f"{shown} is a folder", hint=f"give {what} a file name")
    if kind == "other":
        raise UsageError(f"{shown} is not a regular file, a pipe or a terminal", hint=f"give {what} a file name")
    if kind == "file" and not overwrite:
        raise UsageError(f"{path} already exists", hint="pass --overwrite to replace it")
    if kind == "stream":
        return path
    error = _unwritable(target.parent)
    if error:
        raise type(error)(f"cannot write {shown}: {error.message}",
                          hint=f"choose a {what} in a folder you can write to")
    return path


def nearest_folder(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what a later mkdir -p would start from)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, enabled: bool = True) -> Iterator[Path]:
    """Hold ``folder`` for one run: a second run on it is refused while this one lives.

    An advisory ``flock`` on ``folder/.torchtool.lock`` (created with the folder): the kernel
    drops it when the process dies, however it dies, so a killed run blocks nothing. Under
    torchrun only rank 0 takes it (``enabled``): the ranks of one job are one run. Holding it,
    the temporary files a killed run's atomic writes left behind (``.*.tmp``) are removed.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(exc, folder / LOCK_NAME) or exc from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Failure(f"{folder} is in use by another torchtool run" + (f" (pid {holder})" if holder else ""),
                      hint="wait for it to finish, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    for stale in folder.glob(".*.tmp"):  # a killed run's half-written file: nobody else writes here now
        with contextlib.suppress(OSError):
            stale.unlink()
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_NAME)
        os.close(fd)
