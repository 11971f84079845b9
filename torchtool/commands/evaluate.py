"""torchtool evaluate: the classification report of a checkpoint (or any classifier, or a prediction file)."""

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from torchtool.commands._options import (
    DEFAULT_WORKERS, MAX_PIXELS, Amp, CropPct, Device, FastDecode, Format, ImageSize, InferBatchSize, Interpolation,
    Json, MaxPixels, Mean, ListModels, ModelName, Overwrite, Quiet, Resize, Seed, Std, Strict, Workers,
)
from torchtool.core import output

OUTPUTS = "Outputs"
STATISTICS = "Statistics"


def _file(help: str, metavar: str = "FILE"):
    """An output file option (each its own: they share a shape, not a description)."""
    return Annotated[Optional[Path], typer.Option(metavar=metavar, show_default=False, help=help,
                                                  rich_help_panel=OUTPUTS)]


def _topk(value: str) -> list[int]:
    try:
        ks = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks:
        raise output.UsageError(f"--topk {value!r}: expected comma-separated integers such as 1,5")
    return ks


def run(
    checkpoints: Annotated[Optional[list[str]], typer.Argument(
        metavar="CHECKPOINT", show_default=False,
        help="A finetune checkpoint (run/best.pth): its model, classes, preprocessing and validation images. "
        "Several (runs/*/best.pth): one row each.")] = None,
    model: ModelName = None,
    list_models: ListModels = None,
    weights: Annotated[Optional[str], typer.Option(
        "--weights", "-w", show_default=False, help="With --model: DEFAULT (pretrained), a weights name, none, or a "
        "local weights file.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", show_default=False,
                                                 help="A folder of class sub-folders to evaluate on.")] = None,
    predictions: Annotated[Optional[str], typer.Option(
        metavar="FILE", show_default=False, help="Report on a label,prediction[,score,path] CSV instead of running a "
        "model (- reads stdin; its FILE.scores.npy, when there, gives every class's score).")] = None,
    classes: Annotated[Optional[str], typer.Option(
        metavar="FILE|A,B,...", show_default=False, help="With --predictions: the class names in label order.")] = None,
    topk: Annotated[str, typer.Option("--topk", help="Top-k accuracies to report (capped at the class count).")] = "1,5",
    image_size: ImageSize = None,
    resize: Resize = None,
    crop_pct: CropPct = None,
    interpolation: Interpolation = None,
    mean: Mean = None,
    std: Std = None,
    csv: _file("The per-class report as CSV: class,label,support,precision,recall,f1,auc,ap,confused_1..5, then "
               "All, Macro and Weighted rows.") = None,
    confusion_csv: _file("The confusion matrix as CSV counts (rows: true class, columns: predicted).") = None,
    plot: _file("The confusion matrix as a heatmap, normalised by row.", "FILE.png") = None,
    save_predictions: _file("One row per image: path,label,prediction,score (and the class list once), which "
                            "--predictions reads back to the same report.") = None,
    scores: Annotated[Literal["top", "all"], typer.Option(
        "--scores", rich_help_panel=OUTPUTS, help="What --save-predictions keeps: the top score, or all (every "
        "class's score in FILE.scores.npy beside it: AUC/AP, loss, top-k and --gallery from the file).")] = "top",
    calibration_plot: _file("The reliability diagram behind the ECE figure (accuracy vs confidence per bin).",
                            "FILE.png") = None,
    gallery: _file("The images with the highest loss as captioned thumbnails.", "FILE.png") = None,
    gallery_n: Annotated[int, typer.Option("--gallery-n", min=1, rich_help_panel=OUTPUTS,
                                           help="Images in the gallery.")] = 16,
    gallery_classes: Annotated[Optional[str], typer.Option(
        metavar="A,B,...", show_default=False, rich_help_panel=OUTPUTS,
        help="Only mistakes involving these classes (true or predicted) in the gallery.")] = None,
    html: _file("One self-contained page: summary, per-class table, pictures, comparison.", "FILE.html") = None,
    results_file: _file("Append one row per model (checkpoint, accuracy, top5, macro_f1, ece, loss, images, "
                        "images_per_s) to this .csv or .json.", "FILE.csv|.json") = None,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", min=0, metavar="N", rich_help_panel=STATISTICS,
        help="95% percentile intervals from N resamples of the images (0: none; 1000 is usual).")] = 0,
    seed: Seed = 0,
    compare: Annotated[Optional[str], typer.Option(
        metavar="OTHER", show_default=False, rich_help_panel=STATISTICS,
        help="A second checkpoint or weights file (run on the same images) or prediction .csv: per-class deltas, "
        "the right/wrong table and McNemar's p.")] = None,
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
    """Per-class precision, recall, F1, AUC/AP, the most-confused classes, top-k accuracy, loss and calibration.

    `torchtool evaluate run/best.pth --csv report.csv` needs nothing else: the checkpoint knows its model, classes, preprocessing and validation images (the Preprocessing options override them). Several checkpoints give one row each. --bootstrap adds intervals, --compare a second model on the same images, --gallery/--calibration-plot/--html pictures; --save-predictions writes path,label,prediction,score,classes per image, which --predictions reads back to the same report.

    Unreadable images are skipped, listed, and end the run with exit code 3 (--strict: the first one fails it).
    """
    from torchtool.core.evaluate import EvalConfig, evaluate, evaluate_many
    from torchtool.core.models.preprocess import parse_channels

    fmt = output.pick_format(format, json_)
    checkpoints = checkpoints or []
    cfg = EvalConfig(
        checkpoint=checkpoints[0] if len(checkpoints) == 1 else None, model=model, weights=weights,
        data=_str(data), predictions=predictions, classes=classes, topk=_topk(topk), image_size=image_size,
        resize=resize, crop_pct=crop_pct, interpolation=interpolation, mean=parse_channels(mean, "--mean"),
        std=parse_channels(std, "--std"), csv=_str(csv), confusion_csv=_str(confusion_csv), plot=_str(plot),
        save_predictions=_str(save_predictions), all_scores=scores == "all", calibration_plot=_str(calibration_plot),
        gallery=_str(gallery), gallery_n=gallery_n, gallery_classes=_names(gallery_classes), html=_str(html),
        results_file=_str(results_file), bootstrap=bootstrap, seed=seed, compare=compare, batch_size=batch_size,
        workers=workers, device=device, amp=amp, fast_decode=fast_decode, strict=strict, max_pixels=max_pixels,
        overwrite=overwrite, quiet=quiet)
    if len(checkpoints) > 1:
        rows = evaluate_many(cfg, checkpoints)
        output.emit(_for_people(rows) if fmt in ("table", "markdown") else rows, fmt)
        if any(r["error"] for r in rows):
            raise typer.Exit(output.EXIT_PARTIAL)
        return
    report = evaluate(cfg)
    _render(report, fmt)
    if report.get("output_errors"):  # said after the report, which is whole
        raise output.Failure("; ".join(report["output_errors"].values()),
                             hint="the report and every other output were written")
    if report["skipped"]:
        raise typer.Exit(output.EXIT_PARTIAL)


def _render(report: dict, fmt: str) -> None:
    from torchtool.core.evaluate.report import report_rows, summary_lines
    from torchtool.core.evaluate.stats import compare_rows

    if fmt == "json":
        output.emit(report, fmt)
        return
    rows = report_rows(report, text=fmt != "jsonl")
    table = fmt in ("table", "markdown")
    if table:  # three confused classes fit 100 columns
        rows = [{k: v for k, v in r.items() if k not in ("confused_4", "confused_5")} for r in rows]
    output.emit(rows, fmt)
    if not table:
        return
    output.emit(summary_lines(report) | {"skipped": len(report["skipped"])}, fmt)
    comparison = report.get("comparison")
    if comparison:  # which model is A and B, the right/wrong pairs and McNemar's p; then the deltas per class
        a, b = comparison["names"]
        test = comparison["mcnemar"]
        output.emit({"a": a, "b": b, "images": comparison["images"], "both_right": test["both_right"],
                     "a_only_right": test["a_only"], "b_only_right": test["b_only"], "both_wrong": test["both_wrong"],
                     "mcnemar_p": float(f"{test['p_value']:.4g}")}, fmt)
        output.emit(compare_rows(comparison), fmt, title=f"A: {a}, B: {b} (deltas: B - A)")


def _for_people(rows: list[dict]) -> list[dict]:
    """The rows as a table shows them: fractions with 4 decimals, no error column when nothing failed."""
    failed = any(r["error"] for r in rows)
    return [{k: f"{v:.4f}" if isinstance(v, float) and k != "images_per_s" else v for k, v in r.items()
             if failed or k != "error"} for r in rows]


def _names(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [n.strip() for n in value.split(",") if n.strip()]


def _str(path: Optional[Path]) -> Optional[str]:
    return str(path) if path else None
