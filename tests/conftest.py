"""Shared test helpers: the installed ``torchtool`` executable, run in a subprocess."""

from __future__ import annotations

import os
import signal
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

    def run(*args: str, env: Mapping[str, str] | None = None, timeout: float = GENEROUS_S):
        return subprocess.run([str(torchtool_exe), *args], capture_output=True, text=True,
                              env=_clean_env(env), timeout=timeout, check=False)

    return run


@pytest.fixture(scope="session")
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python ARGS...`` with this interpreter; returns the CompletedProcess (text mode)."""

    def run(*args: str, env: Mapping[str, str] | None = None, timeout: float = GENEROUS_S):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=_clean_env(env), timeout=timeout, check=False)

    return run


# --- long runs and the events they reach (never a fixed sleep or a short timeout) -----------------

GENEROUS_S = 1800  # the bound on waiting for an event: only a hung run reaches it, a busy machine does not


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long end-to-end run (minutes on 2 busy cores); "
                                       "-m 'not slow' leaves it out")
    # A suite started in the background (`pytest &` from a script) inherits an ignored SIGINT, and so would every
    # process it starts: the tests of what Ctrl-C does need it delivered, as at a terminal (each xdist worker
    # runs this too).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def spawn(tmp_path):
    """``spawn(*argv, env=None) -> Popen``: start ``argv`` in its own session, stdout and stderr to files
    (``proc.out``, ``proc.err``: a pipe nobody reads would stall it); at teardown it and every process
    below it are killed (SIGKILL)."""
    import signal

    started: list[subprocess.Popen] = []

    def start(*argv: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        name = tmp_path / f"spawned-{len(started)}"
        with open(f"{name}.out", "wb") as out, open(f"{name}.err", "wb") as err:
            proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err, env=_clean_env(env),
                                    start_new_session=True)
        proc.out, proc.err = Path(f"{name}.out"), Path(f"{name}.err")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        # torchrun starts each worker in a session of its own: kill the whole tree, found before any dies
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    """``wait_for(what, done, proc)``: poll ``done()`` until it is true; fail if ``proc`` ends first or
    :data:`GENEROUS_S` pass (naming ``what`` and the end of the process's stderr)."""
    import time

    def wait(what: str, done: Callable[[], bool], proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + GENEROUS_S
        while True:
            ended = proc.poll() is not None  # before done(): a process that reached it and then ended is fine
            if done():
                return
            if ended or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if ended else f"is still running after {GENEROUS_S} s"
                err = proc.err.read_text(errors="replace")[-3000:] if hasattr(proc, "err") else ""
                pytest.fail(f"waiting for {what}: the process {why}\n{err}")
            time.sleep(0.05)

    return wait


# --- finetune: real digits as an image folder (session-scoped, made once; tests copy before changing it) ---


@pytest.fixture(scope="session")
def digits4(tmp_path_factory) -> Path:
    """4 digits, 16 train + 4 val images each (train/ and val/ folders), 32 px."""
    from tests.finetune_data import write_digits

    return write_digits(tmp_path_factory.mktemp("digits4"), labels=range(4), train_per_class=16, val_per_class=4)


# --- extract-features: real photos and weight files (session-scoped, made once) -----------


def _photo(name: str):
    """One of scikit-learn's bundled photographs (china.jpg, flower.jpg) as an RGB PIL image."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name)).convert("RGB")


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Eight small real photos (crops, resizes, flips, formats, a sub-folder), 64–160 px.

    File names sort in the order they are listed by :func:`photo_files`.
    """
    from PIL import Image, ImageOps

    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    china, flower = _photo("china.jpg"), _photo("flower.jpg")  # both 640x427
    china.resize((160, 107), Image.BILINEAR).save(root / "a_china.jpg", quality=90)
    flower.resize((160, 107), Image.BILINEAR).save(root / "b_flower.jpg", quality=90)
    china.crop((200, 100, 456, 356)).resize((96, 96), Image.BILINEAR).save(root / "c_china_crop.png")
    ImageOps.mirror(flower.crop((0, 0, 427, 427))).resize((80, 80), Image.BILINEAR).save(root / "d_flower_flip.bmp")
    china.rotate(90, expand=True).resize((72, 108), Image.BILINEAR).save(root / "e_china_portrait.jpg", quality=85)
    flower.crop((300, 50, 620, 290)).resize((128, 96), Image.BILINEAR).save(root / "f_flower_crop.webp")
    china.resize((64, 64), Image.BILINEAR).save(root / "sub" / "g_china_square.jpg", quality=95)
    ImageOps.flip(flower).resize((150, 100), Image.BILINEAR).save(root / "sub" / "h_flower_upside_down.png")
    return root


@pytest.fixture(scope="session")
def photo_files(photos_dir: Path) -> list[Path]:
    """The photos in the order ``torchtool extract-features DIR`` walks them."""
    names = ["a_china.jpg", "b_flower.jpg", "c_china_crop.png", "d_flower_flip.bmp", "e_china_portrait.jpg",
             "f_flower_crop.webp", "sub/g_china_square.jpg", "sub/h_flower_upside_down.png"]
    return [photos_dir / n for n in names]


def _random_state_dict(arch: str, seed: int, **kwargs):
    """A randomly initialised torchvision model's state_dict, BatchNorm statistics included."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    for module in model.modules():  # non-trivial running stats, so a BN that is not loaded shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.fixture(scope="session")
def resnet18_weights_pth(tmp_path_factory) -> Path:
    """resnet18 with random weights and a 10-class head, saved with torch.save(state_dict)."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(_random_state_dict("resnet18", 0, num_classes=10), path)
    return path


@pytest.fixture(scope="session")
def mobilenet_weights_safetensors(tmp_path_factory) -> Path:
    """mobilenet_v3_small with random weights, saved with safetensors.torch.save_file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small_random.safetensors"
    save_file({k: v.contiguous() for k, v in _random_state_dict("mobilenet_v3_small", 1).items()}, str(path))
    return path


@pytest.fixture(scope="session")
def squeezenet_weights_pth(tmp_path_factory) -> Path:
    """squeezenet1_0 with random weights, saved with torch.save(state_dict)."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "squeezenet1_0_random.pt"
    torch.save(_random_state_dict("squeezenet1_0", 2), path)
    return path


# --- a small filesystem of our own: full disks and read-only folders, for real ------------------


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(size="1m", ro=False)``: a fresh tmpfs under tmp_path (root only; skipped elsewhere)."""
    mounted: list[Path] = []

    def mount(size: str = "1m", ro: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
