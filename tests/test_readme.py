"""Every command line in the README and in docs/ runs as written, so neither can drift from the tool.

Each ``torchtool ...`` line of the ``sh`` blocks of README.md and docs/**/*.md, each once
(pipes, redirects and ``\\`` continuations included), runs in one working folder that holds what the examples
name (imgs/, more.jpg, data/, photos/, paths.txt): through bash where a line needs a shell or another process,
else in this process through the console script's own entry (``cli.invoke``), with the line's words as bash would
split them. What this machine cannot have is replaced, and nothing else:

- pretrained weights: random-init state_dicts of each architecture the lines name are put
  where torchvision's cache expects the downloads (TORCH_HOME), so ``DEFAULT`` loads them, and
  those of the timm models (``timm:NAME.TAG``) in a Hugging Face cache read offline (HF_HOME);
- the work's size: options making the run small (one epoch, 32 px, the CPU) are appended to the line
  (:func:`small_args`, by ``torchtool`` on PATH, a small script, or before the in-process run); options given
  later win in click, so the line's own options are still parsed and checked;
- lines that need several GPUs (``torchrun --nproc-per-node 4 ... --device cuda``) are
  skipped unless there are that many.

Each line is its own example: the default output folder (features/) is removed before each
one; a ``--resume`` line continues the run of the line before it.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import GENEROUS_S

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# Appended to each command (click takes the last value of an option given twice).
SMALL = {
    "extract-features": ["--image-size", "64", "--workers", "0", "--device", "cpu"],
    "finetune": ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu"],
    "evaluate": ["--workers", "0", "--device", "cpu"],
    # no torch.compile (a minute of g++ on 2 cores) nor bf16 (25x slower on a CPU without bf16 units, and every
    # tip is timed at least 5 times); small batches and images; loader sweeps of a few images
    "profile": ["--device", "cpu", "--max-time", "0.05", "--tips", "channels_last,inference_mode,fold_bn",
                "--dataloader-images", "8", "--batch-size", "2", "--input-size", "3,64,64"],
}


def small_args(args: list[str], small: dict[str, list[str]]) -> list[str]:
    """A command line's words (after ``torchtool``) with ``small``'s options for its command appended, before a
    ``--`` (what follows it is a profiled script's); the small torchtool on PATH runs this too."""
    command = next((a for a in args if not a.startswith("-")), None)
    at = args.index("--") if "--" in args else len(args)
    return [*args[:at], *small.get(command, []), *args[at:]]


def readme_blocks(lang: str) -> list[str]:
    """The fenced blocks of one language in the README and docs/, in that order."""
    return [block for doc in DOCS for block in re.findall(rf"^```{lang}\n(.*?)^```", doc.read_text(), flags=re.S | re.M)]


def command_lines() -> list[str]:
    """The shell lines of the README and docs/ that run torchtool, continuations joined, comments kept out,
    each once (the README's examples are also on the command pages)."""
    lines = []
    for block in readme_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split(" #", 1)[0].strip()
            words = code.split()
            if words and (words[0] in ("torchtool", "torchrun") or "| torchtool " in code):
                lines.append(code)
    return list(dict.fromkeys(lines))


LINES = command_lines()


def gpus_needed(line: str) -> int:
    """GPUs a line needs to succeed: --min-gpus N, one for --require cuda/cudnn, N for torchrun on CUDA."""
    if "torchrun" in line and "cuda" in line:
        return int(re.search(r"--nproc[-_]per[-_]node[ =](\d+)", line).group(1))
    if m := re.search(r"--min-gpus (\d+)", line):
        return int(m.group(1))
    return 1 if re.search(r"--require (cuda|cudnn)", line) else 0


def architectures(lines: list[str]) -> set[str]:
    """The torchvision models whose DEFAULT weights the lines load (resnet18 is the default model)."""
    archs = {"resnet18"}
    for line in lines:
        archs.update(re.findall(r"(?:--model|-m) (\w+)(?![\w:])", line))
    return archs - {"torchtool"}  # python -m torchtool


def timm_models(lines: list[str]) -> set[str]:
    """The timm models (NAME.TAG) whose DEFAULT weights the lines load."""
    return {name for line in lines if "--weights" not in line for name in re.findall(r"--model timm:([\w.]+)", line)}


def fill_hf_cache(hub: Path, names: set[str]) -> None:
    """Random-init weights of each timm model where timm's download puts them (the Hugging Face cache)."""
    import timm
    import torch
    from safetensors.torch import save_file

    for name in sorted(names):
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        folder = hub / f"models--{repo.replace('/', '--')}"
        commit = "0" * 40
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        (folder / "snapshots" / commit).mkdir(parents=True)
        torch.manual_seed(0)
        state = timm.create_model(name, pretrained=False).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / commit / "model.safetensors"))


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory, photo_files) -> tuple[Path, dict[str, str]]:
    """The examples' inputs (a template folder), a TORCH_HOME holding local 'pretrained' weights, the small torchtool."""
    import shutil

    import torch
    import torchvision

    from tests.finetune_data import write_photo_classes

    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    (work / "imgs").mkdir(parents=True)
    for photo in photo_files[:4]:
        shutil.copy(photo, work / "imgs" / photo.name)
    shutil.copy(photo_files[4], work / "more.jpg")
    (work / "paths.txt").write_text("".join(f"{p}\n" for p in sorted((work / "imgs").iterdir())))
    write_photo_classes(work / "data", size=48)  # data/train/<class>, data/val/<class>: JPEGs
    shutil.copytree(work / "data" / "train", work / "photos")  # photos/<class>/ for --val-split
    for other in ("test", "val"):  # more labelled folders for evaluate --data
        shutil.copytree(work / "data" / "val", work / other)
    from tests.video_data import write_video

    for i, (folder, fourcc, suffix) in enumerate([("jump", "mp4v", "mp4"), ("jump", "mp4v", "mp4"),
                                                  ("run", "MJPG", "avi")]):
        write_video(work / "videos" / folder / f"clip{i}.{suffix}", 24 + 8 * i, fourcc)  # video-info's inputs
    (work / "train.py").write_text(textwrap.dedent("""\
        import argparse
        import torch
        parser = argparse.ArgumentParser()
        parser.add_argument("--epochs", type=int, default=1)
        model = torch.nn.Linear(32, 4)
        for _ in range(3 * parser.parse_args().epochs):
            model(torch.randn(16, 32)).sum().backward()
        """))  # what profile's script-mode line runs

    checkpoints = root / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for arch in sorted(architectures(LINES)):
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        torch.manual_seed(0)
        state = torchvision.models.get_model(arch, weights=None).state_dict()
        # half precision: half the bytes to write and read; load_state_dict converts back to float32
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                   checkpoints / os.path.basename(url))

    fill_hf_cache(root / "hf_home" / "hub", timm_models(LINES))

    bin_dir = root / "bin"
    bin_dir.mkdir()
    small = bin_dir / "torchtool"
    small.write_text("\n".join([f"#!{sys.executable}", "import sys", "from torchtool.cli import entry",
                                  inspect.getsource(small_args),
                                  f"sys.argv[1:] = small_args(sys.argv[1:], {SMALL!r})", "entry()", ""]))
    small.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCHTOOL_DEBUG"}
    # torchrun: the one beside this interpreter (a venv's bin need not be on PATH)
    env.update(TORCH_HOME=str(root / "torch_home"), HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]]))
    # gpu-reset's lines see a stand-in GPU that nothing holds: `--yes` must never end real processes here
    (root / "gpus.json").write_text('{"gpus": [{"name": "stand-in GPU", "processes": []}]}')
    env["TORCHTOOL_GPU_STANDIN"] = str(root / "gpus.json")
    return work, env


@pytest.fixture
def workdir(readme_env, tmp_path) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the examples' inputs for one test (the weights and the small torchtool are shared)."""
    import shutil

    template, env = readme_env
    work = tmp_path / "work"
    shutil.copytree(template, work)
    return work, env


def _command(line: str) -> str:
    return re.match(r"(?:.*\| )?(?:torchrun .*-m )?torchtool (\S+)", line).group(1)


def sections(lines: list[str]) -> dict[str, list[str]]:
    """The lines by command, in README order, each section led by the lines that make the runs/ it reads.

    (evaluate's `runs/r18/best.pth` is made by a finetune line: that line runs first in evaluate's
    section too, so each section is a test of its own and the sections run in parallel.)
    """
    made = {ref: line for line in lines for ref in re.findall(r"(?:-o|--out) (runs/\w+)", line)}
    by: dict[str, list[str]] = {}
    for line in lines:
        by.setdefault(_command(line), []).append(line)
    for name, group in by.items():
        needed = [made[ref] for line in group for ref in re.findall(r"runs/\w+", line)
                  if ref in made and made[ref] not in group]
        by[name] = list(dict.fromkeys(needed)) + group
    return by


SECTIONS = sections(LINES)


def test_the_readme_has_examples_of_every_command():
    from torchtool.cli import app

    shown = {_command(line) for line in LINES}
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert commands - {"demo"} <= shown, f"no README example for: {sorted(commands - shown)}"


# What only a shell or another process does: pipes, redirects, globs; torchrun; timm models and checkpoints (the
# Hugging Face client reads HF_HOME and HF_HUB_OFFLINE once, when imported: in this process it would keep this
# test's for the worker's later tests; runs/*/ holds one). Every other line runs in this process (as the console
# script runs it: cli.invoke): ~5 s of torch's import less per line.
NEEDS_A_SHELL = re.compile(r"[|<>;&$`*?]|^torchrun|^python|timm")


def run_in_process(line: str, work: Path, env: dict[str, str], monkeypatch, capsys) -> tuple[int, str]:
    """``torchtool ARGS`` as the small torchtool on PATH runs it (its SMALL options appended), in ``work``,
    with ``env``; returns (exit code, stderr)."""
    import shlex

    from torchtool import cli

    words = small_args(shlex.split(line)[1:], SMALL)
    with monkeypatch.context() as patch:
        patch.chdir(work)
        for key in set(os.environ) - set(env):
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        capsys.readouterr()
        try:
            code = cli.invoke(words)
        except SystemExit as done:  # as the console script exits
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except Exception:
            import traceback

            return -1, capsys.readouterr().err + traceback.format_exc()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(SECTIONS))
def test_every_readme_command_line_runs_as_written(workdir, command, monkeypatch, capsys):
    import shutil

    import torch

    work, env = workdir
    gpus = torch.cuda.device_count()
    failures, ran = [], 0
    lines = SECTIONS[command]
    for line in lines:
        needed = gpus_needed(line)
        if line.startswith("torchrun") and needed > gpus:
            continue  # several GPUs (tests/commands run torchrun on the CPU with gloo)
        shutil.rmtree(work / "features", ignore_errors=True)
        if NEEDS_A_SHELL.search(line):
            proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=GENEROUS_S)
            code, stderr = proc.returncode, proc.stderr
        else:
            code, stderr = run_in_process(line, work, env, monkeypatch, capsys)
        ran += 1
        expected = 1 if needed > gpus else 0
        errors = [e for e in stderr.splitlines() if e.startswith("torchtool: error:")]
        if code != expected or "Traceback" in stderr or (expected and len(errors) != 1):
            failures.append(f"$ {line}\n  exit {code} (expected {expected})\n" + textwrap.indent(stderr[-1500:], "  "))
    assert not failures, "README lines that do not run as written:\n" + "\n".join(failures)
    assert ran >= len(lines) - sum(line.startswith("torchrun") for line in lines)


def test_every_line_is_in_a_section():
    assert sorted({line for group in SECTIONS.values() for line in group}) == sorted(set(LINES))


def test_the_readme_python_example_runs(workdir):
    work, env = workdir
    (example,) = [b for b in readme_blocks("python") if "FeatureExtractor" in b]
    proc = subprocess.run([sys.executable, "-c", example + "\nprint({k: tuple(v.shape) for k, v in feats.items()}, "
                           "tuple(pooled.shape))"], cwd=work, env=env, capture_output=True, text=True, timeout=GENEROUS_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{'relu5_3': (8, 512, 14, 14), 'fc7': (8, 4096)} (8, 262144)"


def test_every_link_in_the_readme_and_docs_resolves():
    """Relative links (and their #anchors) point at files and headings that exist."""
    def anchors(doc: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    broken = []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists() or (anchor and dest.is_file() and anchor not in anchors(dest)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken
    assert len(README.read_text().splitlines()) <= 300  # the README is a map; the pages hold the detail
