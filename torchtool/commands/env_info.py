"""torchtool env-info: the PyTorch environment, for bug reports and for scripts."""

import warnings
from typing import Annotated

import typer

from torchtool.commands._options import Format, Json, Quiet
from torchtool.core import output


def run(
    format: Format = "table",
    json_: Json = False,
    require: Annotated[
        list[str],
        typer.Option("--require", help="Exit 1 unless this is available: cuda, cudnn, mps or xpu (repeatable)."),
    ] = [],  # noqa: B006 - typer needs a literal default
    min_gpus: Annotated[int, typer.Option("--min-gpus", min=0, help="Exit 1 unless at least N GPUs are visible.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Show torch's build, CUDA/cuDNN/NCCL, GPUs, driver, CPU, OS and package versions.

    With --require or --min-gpus it also checks them: exit 0 when met, 1 with a one-line reason otherwise (the report is still printed on stdout).
    """
    from torchtool.core import env

    unknown = [r for r in require if r.lower() not in env.REQUIREMENTS]
    if unknown:
        raise output.UsageError(f"unknown requirement {unknown[0]!r}", hint=f"choose from: {', '.join(env.REQUIREMENTS)}")
    with warnings.catch_warnings():
        if quiet:  # a driver or library's own warnings while probing (torch's CUDA init, NVML)
            warnings.simplefilter("ignore")
        info = env.collect()
    output.emit(info, output.pick_format(format, json_), title="torchtool env-info")
    reasons = env.check_requirements(info, require, min_gpus)
    if reasons:
        raise output.Failure("; ".join(reasons), hint="this environment does not meet --require/--min-gpus")
