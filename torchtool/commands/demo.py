"""torchtool demo: every command on data that ships, offline, each command line printed before it runs."""

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from torchtool.commands._options import Quiet
from torchtool.core import output
from torchtool.core.files import write_error


def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the inputs and everything the commands write.")]
    = Path("torchtool-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Fewer images and epochs: under a minute on 2 CPU cores.")]
    = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what an earlier demo made in --out (its "
                                            "manifest lists it); nothing else there is touched.")] = False,
    quiet: Quiet = False,
) -> None:
    """Show every command working on real data, with no network and no GPU needed.

    Writes scikit-learn's bundled handwritten digits as an image folder, crops of its sample photos and a few short OpenCV videos into OUT, then runs env-info, summary, finetune (resnet18 from scratch on the digits), evaluate (--csv, --plot), extract-features (from the fine-tuned checkpoint), video-info (TSN sampling, frames out), profile --compare and, where a GPU is present, gpu-reset --dry-run — each printed as the command line to copy, run by the same code as typing it. Ends with the accuracy reached, where each output is and what to try next. About a minute on 2 CPU cores (--quick: about 25 s).
    """
    from torchtool.core import demo

    out = demo.prepare_out(out, overwrite)
    restart = shlex.join(["torchtool", "demo", "--out", str(out), *(["--quick"] if quick else []), "--overwrite"])
    started, step = time.perf_counter(), None
    try:
        output.info(f"making the demo's inputs in {out} (digits, photo crops, videos) ...", quiet)
        inputs = demo.make_inputs(out, quick)
        seconds = {"inputs": time.perf_counter() - started}
        output.info("  " + ", ".join(f"{n} {what}" for what, n in inputs.counts.items()), quiet)
        for step in demo.plan(out, inputs, quick, gpu=_has_gpu()):
            typer.echo(f"\n# {step.why}\n$ {step.line}")
            t0 = time.perf_counter()
            code = _invoke(step.argv + (["--quiet"] if quiet else []))
            seconds[step.name] = time.perf_counter() - t0
            if code == 130:  # Ctrl-C inside the command: it said "interrupted" itself
                raise KeyboardInterrupt
            if code:
                raise output.Failure(f"demo step {step.name} failed (exit {code}): see the line above",
                                     hint=f"the command was: {step.line}; `{restart}` starts again")
    except KeyboardInterrupt:
        where = f"during {step.name}" if step else "while making the inputs"
        typer.echo(output.error_line(f"demo interrupted {where}", f"what it made so far is in {out}; "
                                     f"`{restart}` starts again"), err=True)
        raise typer.Exit(130) from None
    except OSError as exc:  # a full disk while making the inputs: say how to start again
        known = write_error(exc, exc.filename or out)
        if known is None:
            raise
        raise output.Failure(known.message, hint=f"{known.hint.split(', then')[0]}; then `{restart}` starts "
                             "again") from None
    seconds["total"] = time.perf_counter() - started
    typer.echo("\n# the demo's report")
    report = demo.report(out, seconds)
    output.emit({k: v for k, v in report.items() if k != "next"}, "table")
    typer.echo("try next:\n" + "\n".join(f"  {line}" for line in report["next"]))


def _invoke(argv: list[str]) -> int:
    """Run one command line through the CLI itself (its option parsing, checks and error lines)."""
    import sys

    from torchtool.cli import invoke

    saved, sys.argv = sys.argv, ["torchtool", *argv]  # what the step records as its command line (config.json)
    try:
        return invoke(argv)
    finally:
        sys.argv = saved


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
