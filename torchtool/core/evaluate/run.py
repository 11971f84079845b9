"""``torchtool evaluate``: a model (or a prediction file) over labelled images -> the classification report.

The model side is :mod:`~torchtool.core.evaluate.inference`; the files are
:mod:`~torchtool.core.evaluate.outputs`; several checkpoints at once are
:mod:`~torchtool.core.evaluate.many`. This module checks the options, builds the report
(with the --compare model's comparison) and hands it to the writers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from torchtool.core import runtime
from torchtool.core.evaluate.config import EvalConfig
from torchtool.core.evaluate.inference import ModelRun, run_models
from torchtool.core.evaluate.outputs import check_outputs, check_predictions, gallery_labels, write_outputs
from torchtool.core.evaluate.predictions import Predictions, read_class_names, read_predictions
from torchtool.core.evaluate.report import build_report
from torchtool.core.evaluate.results import append_results, check_results_file, result_row
from torchtool.core.output import UsageError, info, warn

PREDICTION_SUFFIXES = (".csv", ".tsv", ".txt")  # --compare FILE with these is a prediction file, else weights


def check_options(cfg: EvalConfig) -> None:
    """Every option alone and together, before anything is read."""
    runtime.check_batch_size(cfg.batch_size)
    if any(k < 1 for k in cfg.topk):
        raise UsageError(f"--topk {','.join(map(str, cfg.topk))}: k counts from 1")
    for option, value, least in (("--gallery-n", cfg.gallery_n, 1), ("--bootstrap", cfg.bootstrap, 0)):
        if value < least:
            raise UsageError(f"{option} {value}: must be at least {least}")
    if cfg.predictions is not None:
        given = [o for o, v in (("CHECKPOINT", cfg.checkpoint), ("--model", cfg.model), ("--weights", cfg.weights),
                                ("--data", cfg.data)) if v] + cfg.preprocessing_given()
        if given:
            raise UsageError(f"--predictions needs no model or images: leave out {', '.join(given)}")
    elif cfg.classes:
        raise UsageError("--classes only applies to --predictions", hint="a model brings its own class names")
    if cfg.checkpoint and cfg.weights:
        raise UsageError("give the checkpoint or --weights, not both")
    if cfg.gallery_classes is not None and not (cfg.gallery or cfg.html):
        raise UsageError("--gallery-classes says which mistakes --gallery shows", hint="add --gallery FILE.png")
    if cfg.compare is not None:
        if not Path(cfg.compare).expanduser().is_file():
            raise UsageError(f"--compare {cfg.compare}: no such file",
                             hint="a checkpoint, a weights file, or a prediction CSV of the same images")
        if cfg.predictions is not None and not compares_files(cfg):
            raise UsageError(f"--compare {cfg.compare}: a model needs images, and --predictions has none to give it",
                             hint="compare with the other model's prediction file (--save-predictions)")


def compares_files(cfg: EvalConfig) -> bool:
    """Whether --compare names a prediction file (else a checkpoint or weights file to run)."""
    return cfg.compare is not None and Path(cfg.compare).suffix.lower() in PREDICTION_SUFFIXES


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate and write the requested files; returns the report (every process has it)."""
    check_options(cfg)
    outs = check_outputs(cfg)
    results = check_results_file(cfg.results_file) if cfg.results_file else None
    other = read_predictions(cfg.compare) if compares_files(cfg) else None
    if cfg.predictions is None:
        with runtime.distributed(cfg.device) as dist:
            return evaluate_model(cfg, dist, outs, results, other)
    classes = read_class_names(cfg.classes) if cfg.classes else None
    preds = read_predictions(cfg.predictions, classes)
    check_predictions(cfg, preds, "stdin" if cfg.predictions == "-" else cfg.predictions)
    report = {**_report(cfg, preds, other, cfg.predictions), "source": {"predictions": cfg.predictions},
              "skipped": []}
    write_outputs(cfg, report, preds, outs)
    if results:
        append_results(results, [result_row(cfg.predictions, report)])
    return report


def evaluate_model(cfg: EvalConfig, dist: runtime.Dist, outs: dict[str, Path], results: Path | None = None,
                   other: Predictions | None = None, prefix: str = "") -> dict[str, Any]:
    """One model over its images (and the --compare model or file): the report, written on rank 0."""
    started = time.perf_counter()
    def before(classes: list[str]) -> None:  # once the classes are known, before the first image is read
        gallery_labels(cfg.gallery_classes, classes)
        if other is not None and list(other.classes) != list(classes):
            raise UsageError(f"--compare {cfg.compare} has other classes than the model",
                             hint="compare models of the same classes, in the same order")

    run: ModelRun = run_models(cfg, dist, None if compares_files(cfg) else cfg.compare, before=before)
    label = run.loaded.label
    report = {**_report(cfg, run.preds, run.other if other is None else other, label, prefix),
              "matched_by": run.images.matched_by, "skipped": run.skipped, "source": run.source,
              "images_per_s": run.images_per_s, "seconds": round(time.perf_counter() - started, 3)}
    if dist.is_main:
        write_outputs(cfg, report, run.preds, outs)
        if run.skipped:
            warn(f"{prefix}{len(run.skipped)} of {len(run.images.paths)} images could not be read and are not in "
                 "the report")
        if results:
            append_results(results, [result_row(label, report)])
    dist.barrier()
    return report


def _report(cfg: EvalConfig, preds: Predictions, other: Predictions | None, label: str,
            prefix: str = "") -> dict[str, Any]:
    """The report, with ``comparison`` when there is a second model; its notes said once."""
    from torchtool.core.evaluate.stats import compare

    if preds.scores is not None and (unknown := int(np.isnan(preds.scores).sum())):
        warn(f"{unknown} of {len(preds.labels)} scores in {label} are NaN: the report has no ece")
    report = build_report(preds, ks=cfg.topk, bootstrap=cfg.bootstrap, seed=cfg.seed)
    if other is not None:
        report["comparison"] = compare(preds, other, names=(label, cfg.compare))
    for note in [*report.get("notes", []), *(report.get("comparison") or {}).get("notes", [])]:
        info(f"{prefix}{note}", cfg.quiet)
    return report
