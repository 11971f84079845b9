"""evaluate's files: every one checked before the first image is read, then written, the pictures last.

A picture that cannot be made never costs the report or the other files: it is said in
``report["output_errors"]`` (the command fails with it after printing the report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchtool.core.evaluate.gallery import plot_gallery, top_losses
from torchtool.core.evaluate.plots import plot_calibration, plot_confusion, png_bytes
from torchtool.core.evaluate.config import OUTPUTS, EvalConfig
from torchtool.core.evaluate.predictions import Predictions, scores_path, write_predictions
from torchtool.core.evaluate.report import confusion_csv, report_csv, sample_losses
from torchtool.core.files import atomic_write, atomic_write_text, check_writable
from torchtool.core.output import TorchtoolError, UsageError, first_line, warn

PICTURES = ("plot", "calibration", "gallery")  # drawn in this order; the HTML page's names below
PAGE_NAMES = {"plot": "confusion", "calibration": "calibration", "gallery": "gallery"}


def check_outputs(cfg: EvalConfig) -> dict[str, Path]:
    """Every output checked before any image is read: a run must not end in a file it cannot write."""
    outs = {k: Path(getattr(cfg, name)).expanduser() for k, (_, name, _) in OUTPUTS.items() if getattr(cfg, name)}
    for key, path in outs.items():
        option, _, suffixes = OUTPUTS[key]
        if suffixes and path.suffix.lower() not in suffixes:
            raise UsageError(f"{option} {path} must end in {' or '.join(suffixes)}")
    if cfg.all_scores and "predictions" not in outs:
        raise UsageError("--scores all says what --save-predictions writes", hint="add --save-predictions FILE")
    if cfg.all_scores:
        outs["scores"] = scores_path(outs["predictions"])
    if len(set(outs.values())) < len(outs):
        raise UsageError("two outputs are the same file",
                         hint=f"give {', '.join(o for o, _, _ in OUTPUTS.values())} different paths")
    for key, path in outs.items():
        check_writable(path, cfg.overwrite, what=OUTPUTS[key][0] if key in OUTPUTS else "--scores all")
        if not path.parent.is_dir():
            raise UsageError(f"no such directory for {path}", hint="create the folder first")
    return outs


def gallery_labels(names: list[str] | None, classes: list[str]) -> list[int] | None:
    """--gallery-classes A,B as label indices; an unknown name is a usage error."""
    if names is None:
        return None
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise UsageError(f"--gallery-classes: unknown class {unknown[0]!r}",
                         hint=f"the classes are: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
    return [classes.index(n) for n in names]


def check_predictions(cfg: EvalConfig, preds: Predictions, where: str) -> None:
    """What a prediction file must hold for the pictures and files asked of it, said before any is written."""
    full = "write it with --save-predictions FILE --scores all"
    if cfg.gallery and preds.probs is None:
        raise UsageError(f"{where} has no score for every class: no --gallery (it ranks images by their loss)",
                         hint=full)
    if cfg.gallery and not (preds.paths and any(preds.paths)):
        raise UsageError(f"{where} has no image paths: no --gallery",
                         hint="a prediction file needs a path column for the gallery")
    if cfg.calibration_plot and preds.scores is None:
        raise UsageError(f"{where} has no scores: no --calibration-plot", hint="a prediction file needs a score column")
    if cfg.all_scores and preds.probs is None:
        raise UsageError(f"{where} has no score for every class: nothing for --scores all to write", hint=full)
    gallery_labels(cfg.gallery_classes, preds.classes)


def write_outputs(cfg: EvalConfig, report: dict[str, Any], preds: Predictions, outs: dict[str, Path]) -> None:
    """The files, the pictures last (matplotlib failing on a class name must not cost the others), the page
    last of all (it shows the pictures); notes about the pictures are warned."""
    if "csv" in outs:
        atomic_write_text(outs["csv"], report_csv(report), errors="surrogateescape")
    if "confusion_csv" in outs:
        atomic_write_text(outs["confusion_csv"], confusion_csv(report), errors="surrogateescape")
    if "predictions" in outs:
        write_predictions(outs["predictions"], preds, all_scores=cfg.all_scores)
    report["output_errors"] = {}
    pictures: dict[str, bytes] = {}
    for key in PICTURES:
        if key not in outs and not (outs.get("html") and _fits(key, report, preds)):
            continue
        try:
            shown = outs[key] if key in outs else f"the {PAGE_NAMES[key]} picture of {outs['html']}"
            data, notes = png_bytes(*_drawing(key, cfg, report, preds), name=str(shown))
            if key in outs:
                with atomic_write(outs[key], "wb") as fh:
                    fh.write(data)
            pictures[PAGE_NAMES[key]] = data
            for note in notes:
                warn(note)
        except Exception as exc:  # noqa: BLE001 - whatever matplotlib raises, the report is kept
            report["output_errors"][key] = _failed(OUTPUTS[key][0], outs.get(key), exc)
    if "html" in outs:
        from torchtool.core.evaluate.html import write_html

        try:
            write_html(outs["html"], report, pictures, report.get("comparison"))
        except Exception as exc:  # noqa: BLE001
            report["output_errors"]["html"] = _failed("--html", outs["html"], exc)
    report["files"] = {k: str(v) for k, v in outs.items() if k not in report["output_errors"]}


def _fits(key: str, report: dict[str, Any], preds: Predictions) -> bool:
    """Whether the page can show this picture although no file of it was asked for."""
    if key == "calibration":
        return bool(report.get("calibration"))
    if key == "gallery":
        return preds.probs is not None and bool(preds.paths and any(preds.paths))
    return True


def _drawing(key: str, cfg: EvalConfig, report: dict[str, Any], preds: Predictions) -> tuple[Any, ...]:
    """(picture function, its arguments but the path)."""
    if key == "plot":
        return plot_confusion, report
    if key == "calibration":
        return plot_calibration, report
    losses = sample_losses(preds)
    chosen = top_losses(losses, cfg.gallery_n, preds.labels, preds.predictions,
                                gallery_labels(cfg.gallery_classes, preds.classes))
    return plot_gallery, preds, losses, chosen


def _failed(option: str, path: Path | None, exc: BaseException) -> str:
    why = exc.message if isinstance(exc, TorchtoolError) else first_line(exc)
    return f"could not draw {option} {path}: {why}" if path else f"could not draw {option}'s picture: {why}"
