"""The Typer app: registers each command and maps errors to exit codes. Imports nothing heavy."""

import functools
import importlib
import os
import sys
import traceback
from typing import Annotated, Any, Callable

import typer

from torchtool import __version__
from torchtool.commands._options import humanize
from torchtool.core.files import write_error
from torchtool.core.output import EXIT_FAILURE, EXIT_USAGE, TorchtoolError, debug_enabled, error_line

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away

# command name -> module in torchtool.commands; each module has a ``run`` function.
COMMANDS = {
    "env-info": "env_info",
    "finetune": "finetune",
    "extract-features": "extract_features",
    "evaluate": "evaluate",
    "summary": "summary",
    "profile": "profile",
    "video-info": "video_info",
    "gpu-reset": "gpu_reset",
    "demo": "demo",
}

app = typer.Typer(
    name="torchtool",
    help="Everyday PyTorch recipes as dependable, fast, scriptable commands.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"torchtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also TORCHTOOL_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Everyday PyTorch recipes as dependable, fast, scriptable commands."""
    if debug:
        os.environ["TORCHTOOL_DEBUG"] = "1"


# commands whose rerun picks up where an interrupted run stopped
RESUMABLE = {"finetune", "extract-features"}


def _guarded(func: Callable[..., Any], resumable: bool = False) -> Callable[..., Any]:
    """Run a command, turning errors into one line and an exit code (the one error table)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except TorchtoolError as exc:
            if debug_enabled():
                traceback.print_exc()
            typer.echo(error_line(exc.message, exc.hint), err=True)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:  # `torchtool ... | head`: the reader has all it wants; leave quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except KeyboardInterrupt:
            typer.echo(error_line("interrupted", "rerun the same command to resume" if resumable else None), err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # an unexpected failure: still one line unless debugging
            if debug_enabled():
                raise
            # a full disk or a read-only folder met outside the shared writers is still the user's to fix
            known = write_error(exc, exc.filename or "a file") if isinstance(exc, OSError) else None
            if known is not None:
                typer.echo(error_line(known.message, known.hint), err=True)
            else:
                typer.echo(error_line(f"{type(exc).__name__}: {exc}", "rerun with --debug for the traceback"), err=True)
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper


for _name, _module in COMMANDS.items():
    _run = humanize(importlib.import_module(f"torchtool.commands.{_module}").run)
    app.command(_name)(_guarded(_run, _name in RESUMABLE))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors become one ``torchtool: error:`` line, exit 2."""
    sys.exit(invoke(argv))


def invoke(argv: list[str] | None = None) -> int:
    """Run one command line as the console script does and return its exit code (demo runs its steps so)."""
    try:
        code = app(args=argv, prog_name="torchtool", standalone_mode=False)
    except typer.Abort:
        typer.echo(error_line("aborted"), err=True)
        code = EXIT_FAILURE
    except Exception as exc:
        # click's usage errors (bad option, missing argument) carry format_message/exit_code.
        if not hasattr(exc, "format_message") or debug_enabled():
            raise
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path} --help" if ctx is not None else "torchtool --help"
        message = exc.format_message()
        if message:  # empty for no_args_is_help: the help is already on stdout
            typer.echo(error_line(message, f"see '{where}'"), err=True)
        code = getattr(exc, "exit_code", EXIT_USAGE)
    return code if isinstance(code, int) else 0


def entry() -> None:
    """The console script and ``python -m torchtool``: :func:`main`, then a quick exit.

    Every command has closed and flushed its files by the time it returns, so once torch
    was imported the interpreter's teardown (about a second of freeing torch's modules)
    buys nothing: such a process flushes stdout and stderr and leaves with ``os._exit``.
    """
    _reopen_closed_streams()
    try:
        main()
    except SystemExit as done:
        if "torch" not in sys.modules:
            raise
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else EXIT_FAILURE)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said there
                pass
        os._exit(code)


def _reopen_closed_streams() -> None:
    """Put /dev/null where the shell closed stdin, stdout or stderr (``>&-``).

    Python leaves such a stream as None (every write a traceback), and the next file opened would
    take the free descriptor, so output meant for stdout would land in it. Data for a closed stdout
    is discarded with one line on stderr.
    """
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
            closed.append(fd)
    if not closed:
        return
    sys.stdin = sys.stdin or open(0, encoding="utf-8", errors="surrogateescape", closefd=False)
    sys.stdout = sys.stdout or open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.stderr or open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    if 1 in closed and 2 not in closed:
        print("torchtool: stdout is closed; the output is discarded", file=sys.stderr, flush=True)
