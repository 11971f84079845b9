"""The app as a whole: start-up cost, completion, version, usage errors and the error table."""

from __future__ import annotations

import json
import re
from importlib import metadata

import pytest

from tests.conftest import GENEROUS_S
import typer
from typer.testing import CliRunner

from torchtool import __version__, cli
from torchtool.core import output

# Runs the CLI in-process with the given arguments, then reports the top-level modules that pulled
# in beyond the interpreter's own start-up (on the last stderr line, after what the CLI printed).
PROBE = """
import json, sys
before = {m.partition(".")[0] for m in sys.modules}
from torchtool.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
new = {m.partition(".")[0] for m in list(sys.modules)} - before - set(sys.stdlib_module_names)
new = {m for m in new if not m.startswith("_sysconfigdata")}  # the stdlib's build-time data module
sys.stderr.write("\\nNEW=" + json.dumps(sorted(new)) + "\\n")
"""


def _dependency_closure(dist: str) -> set[str]:
    """``dist`` and every distribution it requires (extras left out), by normalised name."""
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    seen, todo = set(), [norm(dist)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo.extend(norm(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requires if "extra ==" not in r)
    return seen


# What --help and completion may import: the standard library, typer and what typer itself needs
# (rich, shellingham, ...), and torchtool. Any other third-party import there costs start-up time.
_TYPER_DISTS = _dependency_closure("typer")
ALLOWED = {"torchtool"} | {module for module, dists in metadata.packages_distributions().items()
                           if any(re.sub(r"[-_.]+", "-", d).lower() in _TYPER_DISTS for d in dists)}


def _new_modules(stderr: str) -> list[str]:
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("NEW="), stderr
    return json.loads(last.removeprefix("NEW="))


def _not_allowed(stderr: str) -> list[str]:
    return [m for m in _new_modules(stderr) if m not in ALLOWED]


def test_the_allow_list_knows_typer_and_refuses_the_heavy_ones():
    assert {"typer", "rich", "torchtool"} <= ALLOWED
    assert not {"torch", "torchvision", "cv2", "sklearn", "matplotlib", "numpy", "PIL", "tqdm"} & ALLOWED

BASH_COMPLETE_ENV = {"_TORCHTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "torchtool env", "COMP_CWORD": "1"}


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--help"], {}, "env-info"),
        (["env-info", "--help"], {}, "--require"),
        ([], BASH_COMPLETE_ENV, "env-info"),
        ([], {"_TORCHTOOL_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "torchtool env-info --re"}, "--require"),
        ([], {"_TORCHTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "torchtool finetune d --model resn",
              "COMP_CWORD": "4"}, "resnet18"),
    ],
    ids=["help", "env-info-help", "complete-bash", "complete-zsh", "complete-model"],
)
def test_startup_imports_only_the_allowed_modules(run_python, args, env, expected):
    proc = run_python("-c", PROBE, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout
    assert "torchtool" in _new_modules(proc.stderr)  # the probe sees what the CLI imports
    assert _not_allowed(proc.stderr) == [], f"'torchtool {' '.join(args)}' imported third-party modules"


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_command_help_imports_only_the_allowed_modules(run_python, command):
    proc = run_python("-c", PROBE, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"Usage: torchtool {command}" in proc.stdout
    assert _not_allowed(proc.stderr) == [], f"'torchtool {command} --help' imported third-party modules"


def test_bash_completion_returns_the_command(run_torchtool):
    proc = run_torchtool(env=BASH_COMPLETE_ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["env-info"]


def test_bash_completion_of_options(run_torchtool):
    env = {"_TORCHTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "torchtool env-info --mi", "COMP_CWORD": "2"}
    proc = run_torchtool(env=env)
    assert proc.stdout.split() == ["--min-gpus"]


@pytest.mark.parametrize(("words", "expected"), [
    ("torchtool extract-features --model vgg1", ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
                                                 "vgg19", "vgg19_bn"]),
    ("torchtool evaluate --device cu", ["cuda", "cuda:0", "cuda:1"]),
    ("torchtool profile resnet18 --tips f", ["fp16", "fold_bn"]),
    ("torchtool profile resnet18 --tips bf16,channels_last,f", ["bf16,channels_last,fp16", "bf16,channels_last,fold_bn"]),
])
def test_completion_of_models_devices_and_tips(run_torchtool, words, expected):
    env = {"_TORCHTOOL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
    proc = run_torchtool(env=env)
    assert proc.stdout.split() == expected, proc.stderr


def test_the_completion_model_list_is_torchvisions():
    from torchtool.core.models.names import KNOWN_MODELS, classification_models

    assert sorted(KNOWN_MODELS) == sorted(classification_models()), "update KNOWN_MODELS for this torchvision"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(run_torchtool, flag):
    proc = run_torchtool(flag)
    assert proc.returncode == 0
    assert proc.stdout == f"torchtool {__version__}\n"
    assert proc.stderr == ""


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["--bogus"], "No such option: --bogus", "see 'torchtool --help'"),
        (["env-info", "--bogus"], "No such option: --bogus", "see 'torchtool env-info --help'"),
        (["env-info", "--min-gpus", "-1"], "--min-gpus", "see 'torchtool env-info --help'"),
        (["no-such-command"], "No such command 'no-such-command'", "see 'torchtool --help'"),
    ],
    ids=["root-option", "command-option", "bad-value", "unknown-command"],
)
def test_usage_error_is_one_line_and_exit_2(run_torchtool, args, message, hint):
    proc = run_torchtool(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("torchtool: error: ") and message in lines[0]
    assert lines[1] == f"  hint: {hint}"
    assert "Traceback" not in proc.stderr


def test_no_arguments_shows_help_without_an_error_line(run_torchtool):
    proc = run_torchtool()
    assert "Usage: torchtool" in proc.stdout
    assert "torchtool: error:" not in proc.stderr
    assert proc.returncode == 2


def test_python_dash_m(run_python):
    proc = run_python("-m", "torchtool", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: torchtool [OPTIONS] COMMAND [ARGS]..." in proc.stdout
    assert "env-info" in proc.stdout


def test_short_help_option(run_torchtool):
    proc = run_torchtool("env-info", "-h")
    assert proc.returncode == 0
    assert "--min-gpus" in proc.stdout


# --- end to end through the installed executable ------------------------------


@pytest.fixture(scope="module")
def env_info_json(run_torchtool):
    return run_torchtool("env-info", "--format", "json")


def test_env_info_json_end_to_end(env_info_json):
    import torch

    assert env_info_json.returncode == 0, env_info_json.stderr
    assert env_info_json.stderr == ""
    info = json.loads(env_info_json.stdout)
    assert info["torch"]["version"] == torch.__version__
    assert info["torchtool_version"] == __version__
    assert isinstance(info["cpu"]["logical_cores"], int)


def test_unmet_requirement_keeps_stdout_parseable(run_torchtool):
    proc = run_torchtool("env-info", "--json", "--min-gpus", "9999")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["cuda"]["device_count"] < 9999
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("torchtool: error: 9999 GPU(s) required")
    assert len(lines) == 2 and lines[1].startswith("  hint: ")


# --- the error table -----------------------------------------------------------

# The real app plus a throwaway command that fails unexpectedly, run through main().
BOOM = """
import sys
from torchtool import cli

def boom() -> None:
    \"\"\"Fail with an exception nobody anticipated.\"\"\"
    raise RuntimeError("kaboom")

cli.app.command("boom")(cli._guarded(boom))
cli.main(sys.argv[1:])
"""


def test_unexpected_exception_is_one_line_exit_1(run_python):
    proc = run_python("-c", BOOM, "boom")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "torchtool: error: RuntimeError: kaboom",
        "  hint: rerun with --debug for the traceback",
    ]


@pytest.mark.parametrize(("args", "env"), [(["--debug", "boom"], {}), (["boom"], {"TORCHTOOL_DEBUG": "1"})],
                         ids=["--debug", "TORCHTOOL_DEBUG"])
def test_debug_shows_the_traceback(run_python, args, env):
    proc = run_python("-c", BOOM, *args, env=env)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert ", in boom\n" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "RuntimeError: kaboom"


def _guarded_app(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @cli._guarded
    def fail() -> None:
        raise exc

    return app


@pytest.mark.parametrize(
    ("exc", "code", "lines"),
    [
        (output.UsageError("no such layer 'fc9'", hint="see --list-layers"), 2,
         ["torchtool: error: no such layer 'fc9'", "  hint: see --list-layers"]),
        (output.Failure("CUDA is not available"), 1, ["torchtool: error: CUDA is not available"]),
        (KeyboardInterrupt(), 130, ["torchtool: error: interrupted"]),
        (OSError(28, "No space left on device", "/data/feats/gap.npy"), 1,
         ["torchtool: error: no space left on device while writing /data/feats/gap.npy",
          "  hint: free some space (or choose another --out), then rerun the same command"]),
    ],
    ids=["usage", "failure", "interrupt", "full-disk"],
)
def test_error_table(monkeypatch, exc, code, lines):
    monkeypatch.delenv("TORCHTOOL_DEBUG", raising=False)
    result = CliRunner().invoke(_guarded_app(exc), [])
    assert result.exit_code == code
    assert result.stdout == ""
    assert result.stderr.splitlines() == lines


def test_only_commands_that_resume_say_so_when_interrupted(monkeypatch):
    monkeypatch.delenv("TORCHTOOL_DEBUG", raising=False)
    said = {}
    for name in cli.COMMANDS:
        app = typer.Typer()
        app.command()(cli._guarded(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), name in cli.RESUMABLE))
        said[name] = CliRunner().invoke(app, []).stderr
    assert all("resume" in said[name] for name in ("finetune", "extract-features"))
    assert not any("resume" in said[name] for name in ("evaluate", "summary", "profile", "video-info", "demo"))


def test_closed_standard_streams_give_one_line_or_silence(torchtool_exe):
    import subprocess

    exe = str(torchtool_exe)
    for redirect, want_err in ((">&-", "stdout is closed"), ("<&-", ""), ("2>&-", "")):
        proc = subprocess.run(["bash", "-c", f'"$0" env-info --json {redirect}', exe], capture_output=True, text=True)
        assert proc.returncode == 0, (redirect, proc.stderr)
        assert "Traceback" not in proc.stderr and "NoneType" not in proc.stderr
        assert (want_err in proc.stderr) if want_err else proc.stderr == ""
        if redirect != ">&-":
            assert json.loads(proc.stdout)["torchtool_version"]


def test_a_reader_that_stops_early_ends_the_command_quietly(torchtool_exe):
    """`torchtool ... | head`: no error line, no 'Exception ignored' from the last flush; exit 141 like SIGPIPE."""
    import subprocess

    proc = subprocess.run(["bash", "-c", f"set -o pipefail; '{torchtool_exe}' env-info --json | true"],
                          capture_output=True, text=True, timeout=GENEROUS_S)
    assert proc.returncode == 141 and proc.stderr == ""


def _command_params():
    from typer.main import get_command

    group = get_command(cli.app)
    return [(name, sub, param) for name, sub in sorted(group.commands.items()) for param in sub.params]


@pytest.mark.parametrize(("command", "param"), [(n, p.name) for n, _, p in _command_params()])
def test_every_option_and_argument_has_a_description(command, param):
    (found,) = [p for n, _, p in _command_params() if n == command and p.name == param]
    assert (found.help or "").strip(), f"torchtool {command}: {found.opts or found.name} has no help text"


def test_help_shows_no_raw_python_types_and_one_usage_style():
    """A flag takes no value (no <bool>); numbers and names read N, X, PATH, DEVICE, not <int range> or <list[str]>;
    the usage lines spell arguments one way: {REQUIRED}, [OPTIONAL], ... when repeated."""
    raw = re.compile(r"<(bool|str|int|float|path)( range)?>|<list\[")
    usage = re.compile(r"^Usage: torchtool [a-z-]+ \[OPTIONS\]( (\{[A-Z_]+\}|\[[A-Z_]+\])(\.\.\.)?)*$")
    for command in cli.COMMANDS:
        result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert result.exit_code == 0
        lines = [line.strip(" │") for line in result.stdout.splitlines()]
        options = [line for line in lines if line.lstrip("* ").startswith("--")
                   and not line.lstrip("* ").startswith("--help")]  # --help is Typer's own row
        assert not [line for line in options if raw.search(line)], (command, [l for l in options if raw.search(l)])
        (used,) = [line.strip() for line in lines if line.strip().startswith("Usage:")]
        assert usage.match(re.sub(r"\s+", " ", used)), used
