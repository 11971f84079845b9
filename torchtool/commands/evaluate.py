"""torchtool evaluate: the classification report of a checkpoint (or any classifier, or a prediction file)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from torchtool.commands._options import (
    DEFAULT_WORKERS, MAX_PIXELS, Amp, Device, FastDecode, Format, InferBatchSize, Json, MaxPixels, ModelName, Overwrite, Quiet,
    Strict, Workers,
)
from torchtool.core import output



def _file(help: str):
    """An output file option (each its own: they share a shape, not a description)."""
    return Annotated[Optional[Path], typer.Option(metavar="FILE", show_default=False, help=help)]


def _topk(value: str) -> list[int]:
    try:
        ks = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks:
        raise output.UsageError(f"--topk {value!r}: expected comma-separated integers such as 1,5")
    return ks


def run(
    checkpoint: Annotated[Optional[str], typer.Argument(
        show_default=False,
        help="A finetune checkpoint (run/best.pth): its model, classes, preprocessing and validation images.")] = None,
    model: ModelName = None,
    weights: Annotated[Optional[str], typer.Option(
        "--weights", "-w", show_default=False, help="With --model: DEFAULT (pretrained), a weights name, none, or a "
        "local weights file.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", show_default=False,
                                                 help="A folder of class sub-folders to evaluate on.")] = None,
    predictions: Annotated[Optional[str], typer.Option(
        metavar="FILE", show_default=False, help="Report on a label,prediction[,score,path] CSV instead of running a "
        "model (- reads stdin).")] = None,
    classes: Annotated[Optional[str], typer.Option(
        metavar="FILE|A,B,...", show_default=False, help="With --predictions: the class names in label order.")] = None,
    topk: Annotated[str, typer.Option("--topk", help="Top-k accuracies to report (capped at the class count).")] = "1,5",
    csv: _file("The per-class report as CSV: class,label,support,precision,recall,f1,confused_1..5, then All "
               "and Macro rows.") = None,
    confusion_csv: _file("The confusion matrix as CSV counts (rows: true class, columns: predicted).") = None,
    plot: Annotated[Optional[Path], typer.Option(metavar="FILE.png", show_default=False,
                                                 help="The confusion matrix as a heatmap, normalised by row.")] = None,
    save_predictions: _file("One row per image: path,label,prediction,score (and the class list once), which "
                            "--predictions reads back to the same report.") = None,
    batch_size: InferBatchSize = None,
    workers: Workers = DEFAULT_WORKERS,
    device: Device = "auto",
    amp: Amp = False,
    fast_decode: FastDecode = False,
    strict: Strict = False,
    max_pixels: MaxPixels = MAX_PIXELS,
    overwrite: Overwrite = False,
    format: Format = "table",
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    """Per-class precision, recall and F1, the most-confused classes, top-k accuracy and calibration.

    `torchtool evaluate run/best.pth --csv report.csv` needs nothing else: the checkpoint knows its model, classes, preprocessing and validation images. --csv writes class,label,support,precision,recall,f1,confused_1..5 (then All and Macro rows); --confusion-csv the counts; --plot a heatmap; --save-predictions path,label,prediction,score,classes per image (classes: the class names, once), which --predictions reads back to the same report.

    Unreadable images are skipped, listed, and end the run with exit code 3 (--strict: the first one fails it).
    """
    from torchtool.core.evaluate import EvalConfig, evaluate
    from torchtool.core.evaluate.report import report_rows, summary_lines

    fmt = output.pick_format(format, json_)
    report = evaluate(EvalConfig(
        checkpoint=checkpoint, model=model, weights=weights, data=str(data) if data else None, predictions=predictions,
        classes=classes, topk=_topk(topk), csv=_str(csv), confusion_csv=_str(confusion_csv), plot=_str(plot),
        save_predictions=_str(save_predictions), batch_size=batch_size, workers=workers, device=device, amp=amp,
        fast_decode=fast_decode,
        strict=strict, max_pixels=max_pixels, overwrite=overwrite, quiet=quiet))
    if fmt == "json":
        output.emit(report, fmt)
    else:
        rows = report_rows(report, text=fmt != "jsonl")
        if fmt in ("table", "markdown"):  # three confused classes fit 100 columns
            rows = [{k: v for k, v in r.items() if k not in ("confused_4", "confused_5")} for r in rows]
        output.emit(rows, fmt)
        if fmt in ("table", "markdown"):
            output.emit(summary_lines(report) | {"skipped": len(report["skipped"])}, fmt)
    if report.get("output_errors"):  # said after the report, which is whole
        raise output.Failure("; ".join(report["output_errors"].values()),
                             hint="the report and every other output were written")
    if report["skipped"]:
        raise typer.Exit(output.EXIT_PARTIAL)


def _str(path: Optional[Path]) -> Optional[str]:
    return str(path) if path else None
