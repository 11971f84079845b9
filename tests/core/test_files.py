"""Atomic writes and the refuse-to-overwrite rule (torchtool.core.files)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.conftest import GENEROUS_S

from torchtool.core import files
from torchtool.core.output import TorchtoolError, UsageError


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "index.csv"
    target.write_text("old\n")
    with files.atomic_write(target) as fh:
        fh.write("new\n")
    assert target.read_text() == "new\n"
    assert _leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "index.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk on fire"), files.atomic_write(target) as fh:
        fh.write("half of the new conte")
        fh.flush()
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.csv"]


def test_atomic_write_creates_missing_folders_and_nothing_when_it_fails(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    with pytest.raises(KeyboardInterrupt), files.atomic_write(target) as fh:
        fh.write("{")
        raise KeyboardInterrupt
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    files.atomic_write_text(target, '{"ok": true}')
    assert json.loads(target.read_text()) == {"ok": True}


def test_atomic_write_binary_mode(tmp_path):
    target = tmp_path / "blob.bin"
    with files.atomic_write(target, "wb") as fh:
        fh.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_save_calls_the_writer_with_a_temporary_path(tmp_path):
    target = tmp_path / "model.pt"
    seen = []

    def writer(path):
        seen.append(path)
        path.write_bytes(b"weights")

    files.atomic_save(target, writer)
    assert target.read_bytes() == b"weights"
    assert seen[0].parent == tmp_path and seen[0] != target
    assert _leftovers(tmp_path) == []


def test_atomic_save_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"good checkpoint")

    def writer(path):
        path.write_bytes(b"trunc")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.atomic_save(target, writer)
    assert target.read_bytes() == b"good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        new = tmp_path / "new.txt"
        files.atomic_write_text(new, "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # as open() would, not mkstemp's 0600
        kept = tmp_path / "kept.txt"
        kept.write_text("x")
        kept.chmod(0o640)
        files.atomic_write_text(kept, "y")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_check_writable(tmp_path):
    target = tmp_path / "features.npy"
    assert files.check_writable(target, overwrite=False) == target
    target.write_bytes(b"x")
    with pytest.raises(UsageError) as info:
        files.check_writable(str(target), overwrite=False)
    assert info.value.exit_code == 2
    assert str(target) in info.value.message
    assert "--overwrite" in info.value.hint
    assert files.check_writable(target, overwrite=True) == target


# --- write errors, output folders, disk space -----------------------------------------------------


def test_write_errors_are_one_line_naming_the_path_and_the_cause(tmp_path):
    import errno

    failure = files.write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x.npy")
    assert failure.message == f"no space left on device while writing {tmp_path / 'x.npy'}"
    assert "rerun the same command" in failure.hint and failure.exit_code == 1
    assert files.write_error(OSError(errno.EROFS, "Read-only"), "y").message == "read-only file system while writing y"
    assert files.write_error(OSError(errno.ENOENT, "No such file"), "z") is None  # not a write problem
    assert files.write_error(RuntimeError("zip writer failed"), tmp_path / "a.pth") is None  # the disk is not full


def test_a_full_disk_fails_an_atomic_write_with_one_line(mount_tmpfs):
    disk = mount_tmpfs("64k")
    with pytest.raises(files.Failure, match=r"^no space left on device while writing .*big\.bin$"):
        with files.atomic_write(disk / "big.bin", "wb") as fh:
            fh.write(b"x" * 200_000)
    assert list(disk.iterdir()) == []  # the temporary file is gone too


def test_torch_save_on_a_full_disk_says_so(mount_tmpfs):
    import torch

    disk = mount_tmpfs("256k")
    with pytest.raises(files.Failure, match="no space left on device while writing .*last.pth"):
        files.atomic_save(disk / "last.pth", lambda tmp: torch.save({"w": torch.zeros(200_000)}, tmp))


def test_space_is_checked_and_reserved(mount_tmpfs):
    disk = mount_tmpfs("1m")
    with pytest.raises(files.Failure, match=r"needs 2\.0 MB for the features, 1\.0 MB free"):
        files.check_space(disk, 2_000_000, "the features")
    fd = os.open(disk / "rows.bin", os.O_RDWR | os.O_CREAT)
    try:
        assert files.reserve(fd, 600_000, disk / "rows.bin")
        assert os.fstat(fd).st_blocks * 512 >= 600_000  # allocated, not a sparse hole
        with pytest.raises(files.Failure, match="no space left on device while writing"):
            files.reserve(fd, 2_000_000, disk / "rows.bin")
    finally:
        os.close(fd)


def test_writable_dir(tmp_path, mount_tmpfs):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="--out .*a_file is a file"):
        files.writable_dir(tmp_path / "a_file")
    assert files.writable_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checked, not created
    readonly = mount_tmpfs("1m", ro=True)
    with pytest.raises(files.Failure, match="cannot write to --out .*: read-only file system"):
        files.writable_dir(readonly / "run")


def test_a_writer_that_replaces_its_file_still_gets_ordinary_permissions(tmp_path):
    def recreate(tmp):  # as safetensors' save_file does: a new file at the path it was given
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"weights")
        os.close(fd)

    files.atomic_save(tmp_path / "w.safetensors", recreate)
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_the_run_lock_clears_a_killed_runs_temporary_files(tmp_path):
    (tmp_path / "run").mkdir()
    stale = tmp_path / "run" / ".last.pth.k3j2.tmp"
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / "run" / "keep.txt").write_text("x")
    with files.run_lock(tmp_path / "run"):
        assert not stale.exists() and (tmp_path / "run" / "keep.txt").exists()
        with pytest.raises(files.Failure, match="is in use by another torchtool run"):
            with files.run_lock(tmp_path / "run"):
                pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


# --- outputs that are not ours to replace, names at the file system's limit ------------------------


def test_a_symlink_output_writes_its_target_and_stays_a_link(tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    files.check_writable(link, overwrite=True)
    files.atomic_write_text(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert _leftovers(tmp_path) == []


def test_a_fifo_is_written_through_and_never_replaced(tmp_path):
    import threading

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    files.check_writable(fifo, overwrite=False)  # nothing is replaced, so no --overwrite is needed
    files.atomic_write_text(fifo, "a,b\n")
    reader.join(timeout=GENEROUS_S)
    assert got == [b"a,b\n"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_character_device_is_written_through_not_renamed_over(tmp_path):
    devnull = os.stat(os.devnull)
    files.check_writable(os.devnull, overwrite=True)
    files.atomic_write_text(os.devnull, "discarded\n")
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (devnull.st_ino, devnull.st_rdev)
    # /dev/stdout is a link to the process's own descriptor: written through too
    link = tmp_path / "stdout-like"
    link.symlink_to(os.devnull)
    files.atomic_write_text(link, "x")
    assert link.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_folders_sockets_and_block_devices_are_refused(tmp_path):
    import socket

    (tmp_path / "adir").mkdir()
    with pytest.raises(UsageError, match="--csv .*adir is a folder"):
        files.check_writable(tmp_path / "adir", overwrite=True, what="--csv")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    try:
        with pytest.raises(UsageError, match="not a regular file"):
            files.check_writable(tmp_path / "s.sock", overwrite=True)
        with pytest.raises(UsageError, match="not a regular file"), files.atomic_write(tmp_path / "s.sock") as fh:
            fh.write("x")
    finally:
        sock.close()
    block = next((p for p in ("/dev/loop0", "/dev/sda", "/dev/vda", "/dev/nvme0n1") if os.path.exists(p)
                  and stat.S_ISBLK(os.stat(p).st_mode)), None)
    if block:
        with pytest.raises(UsageError, match="not a regular file"):
            files.check_writable(block, overwrite=True)


def test_an_output_under_a_file_or_in_a_read_only_folder_is_refused_before_the_run(tmp_path, mount_tmpfs):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TorchtoolError):
        files.check_writable(tmp_path / "afile" / "report.csv", overwrite=False)  # exit 2 or 1, before any work
    readonly = mount_tmpfs("1m", ro=True)
    with pytest.raises(files.Failure, match="read-only file system"):
        files.check_writable(readonly / "report.csv", overwrite=True, what="--csv")


def test_names_at_the_file_systems_limit(tmp_path):
    limit = os.statvfs(tmp_path).f_namemax
    longest = tmp_path / ("r" * (limit - 4) + ".csv")  # fits, but .NAME.XXXXXXXX.tmp would not
    files.check_writable(longest, overwrite=False)
    files.atomic_write_text(longest, "ok\n")
    assert longest.read_text() == "ok\n" and _leftovers(tmp_path) == []
    with pytest.raises(UsageError, match=f"file name too long \\({limit + 1} bytes; the file system allows {limit}\\)"):
        files.check_writable(tmp_path / ("r" * (limit - 3) + ".csv"), overwrite=False, what="--csv")
    # multi-byte names are cut on bytes for the temporary name, never beyond the limit
    wide = tmp_path / ("é" * ((limit - 4) // 2) + ".csv")
    files.atomic_write_text(wide, "ok\n")
    assert wide.read_text() == "ok\n" and _leftovers(tmp_path) == []


def test_sizes_beyond_terabytes():
    assert files.human_bytes(999) == "999 B"
    assert files.human_bytes(1.5e15) == "1.5 PB"
    assert files.human_bytes(2.5e18) == "2.5 EB"
    assert files.human_bytes(1500) == "1.5 KB"
