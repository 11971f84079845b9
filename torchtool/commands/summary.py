"""torchtool summary: a model's layers, parameters, MACs and memory, on the meta device (no weights in memory)."""

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from torchtool.commands._options import (BatchSize, Format, InputSize, Json, Kwargs, ListModels, ModelSpec, Overwrite,
                                         Quiet)
from torchtool.core import output


def run(
    model: ModelSpec,
    list_models: ListModels = None,
    kwargs: Kwargs = None,
    input_size: InputSize = None,
    batch_size: BatchSize = 1,
    dtype: Annotated[Literal["float32", "float16", "bfloat16", "float64"], typer.Option(
        "--dtype", help="The parameters' and floating inputs' dtype.")] = "float32",
    depth: Annotated[int, typer.Option("--depth", min=0, help="Fold layers deeper than this into their parents.")] = 3,
    graph: Annotated[Optional[Path], typer.Option(
        metavar="FILE.dot|svg|png", show_default=False,
        help="Draw the autograd graph of one forward (SVG/PNG need Graphviz's dot; else the DOT is written).")] = None,
    overwrite: Overwrite = False,
    format: Format = "table",
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    """Layers, output shapes, parameters (each counted once), MACs and FLOPs, and memory of a model.

    MODEL is a torchvision model name (resnet50), a checkpoint or weights file (run/best.pth), or module:factory / path/to/file.py:factory. The model is built and run on the meta device, so nothing is allocated: models larger than RAM take seconds. FLOPs come from torch's FlopCounterMode (convolutions, matmul, attention); MACs = FLOPs / 2.
    """
    from torchtool.core.inspect.summary import SummaryConfig, layer_rows, summarize, totals
    from torchtool.core.models.spec import parse_kwargs

    fmt = output.pick_format(format, json_)
    report = summarize(SummaryConfig(model, parse_kwargs(kwargs), input_size or [], batch_size, dtype, depth,
                                     str(graph) if graph else None, overwrite))
    for note in report["notes"]:
        output.info(note, quiet)
    if fmt == "json":
        output.emit(report, fmt)
        return
    output.emit(layer_rows(report, fmt), fmt)
    if fmt in ("table", "markdown"):
        output.emit(totals(report), fmt)
