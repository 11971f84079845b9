"""torchtool profile: latency, throughput and memory of a model here; the speed tips that pay off; loading; traces."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from torchtool.commands._options import (
    MAX_PIXELS, BatchSize, Device, Format, InputSize, Json, Kwargs, ListModels, MaxPixels, ModelSpec, Overwrite,
    Quiet, complete_list,
)
from torchtool.core import output


def _tips() -> tuple[str, ...]:
    from torchtool.core.inspect import TIPS

    return TIPS


def run(
    model: ModelSpec,
    list_models: ListModels = None,
    script_args: Annotated[Optional[list[str]], typer.Argument(
        metavar="ARGS", show_default=False, help="With a script.py: its arguments, after --.")] = None,
    kwargs: Kwargs = None,
    input_size: InputSize = None,
    batch_size: BatchSize = 1,
    device: Device = "auto",
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, show_default=False, help="CPU threads for torch (default: what torch uses).")] = None,
    backward: Annotated[bool, typer.Option(
        "--backward", help="Also time a training step: forward, backward and an SGD step.")] = False,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Measure the speed tips against the fp32 baseline, outputs checked; a tip is called "
        "faster or slower only when the speed-up's range from both quartiles excludes 1.")] = False,
    tips: Annotated[Optional[str], typer.Option(
        metavar="LIST", show_default=False, autocompletion=complete_list(_tips), help="With --compare, only these (comma-separated): channels_last, "
        "bf16, fp16, cudnn_benchmark, compile, inference_mode, fold_bn.")] = None,
    dataloader: Annotated[Optional[Path], typer.Option(
        metavar="DIR", show_default=False, help="Time loading this image folder over loader worker counts (the --workers "
        "of extract-features, evaluate and finetune), batch sizes and "
        "pin_memory, and say whether loading or the forward is the bottleneck.")] = None,
    dataloader_images: Annotated[int, typer.Option(
        metavar="N", min=1, help="Images per loader setting in the --dataloader sweep.")] = 256,
    trace: Annotated[Optional[Path], typer.Option(
        metavar="FILE.json", show_default=False, help="Write a torch.profiler trace (chrome://tracing, Perfetto).")
    ] = None,
    top: Annotated[int, typer.Option(
        metavar="N", min=0, help="Print the N operators with the most self time (a script: 15 by default).")] = 0,
    max_time: Annotated[float, typer.Option(
        metavar="SECONDS", min=0.01, help="Time budget of each measurement (torch.utils.benchmark's adaptive "
        "autorange stops earlier once the median is stable; a slow call still gets 5 timed runs, said on "
        "stderr).")] = 2.0,
    max_pixels: MaxPixels = MAX_PIXELS,
    overwrite: Overwrite = False,
    format: Format = "table",
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    """How fast MODEL runs here and where the time goes.

    MODEL is taken as summary takes it (a torchvision name, a checkpoint or weights file, module:factory or file.py:factory), or a script: `torchtool profile train.py -- ARGS` runs it once under cProfile and torch.profiler and prints both top tables (what torch.utils.bottleneck does).

    Prints the forward's median latency and IQR (torch.utils.benchmark, warmed up, all of torch's threads), throughput (batch size / median) and peak memory. --format csv/jsonl prints the compare matrix, else the loader sweep, else the top operators, else the latency record.
    """
    from torchtool.core.inspect import views
    from torchtool.core.inspect.profile import ProfileConfig, profile
    from torchtool.core.models.spec import parse_kwargs

    fmt = output.pick_format(format, json_)
    report = profile(ProfileConfig(
        model, parse_kwargs(kwargs), input_size or [], batch_size, device, threads, backward, compare,
        [t.strip() for t in tips.split(",") if t.strip()] if tips else None, str(dataloader) if dataloader else None,
        dataloader_images, max_pixels, str(trace) if trace else None, top, max_time, script_args or [], overwrite,
        quiet))
    if fmt == "json":
        output.emit(report, fmt)
    elif fmt in ("csv", "jsonl"):
        output.emit(views.records(report), fmt)
    elif "script" in report:
        output.emit(views.script_rows(report["python_top"]), fmt)
        if report["torch_top"]:
            output.emit(views.ops_rows(report["torch_top"]), fmt)
    else:
        output.emit(views.headline(report), fmt)
        for rows in (report["compare"] and views.compare_rows(report["compare"]),
                     report["dataloader"] and views.sweep_rows(report["dataloader"]),
                     report["top_ops"] and views.ops_rows(report["top_ops"])):
            if rows:
                output.emit(rows, fmt)
    if report.get("exit_code"):
        why = f": {report['exception']}" if report.get("exception") else ""
        output.warn(f"{report['script']} ended with exit code {report['exit_code']}{why}")
        raise typer.Exit(report["exit_code"])
