"""``torchtool evaluate runs/*/best.pth``: several checkpoints, each on its own data, one row each.

What timm's validate.py does for a folder of checkpoints. A checkpoint that cannot be
evaluated (its validation folder gone, a file that is not a model) gets a row with its
error and the others go on; the command then exits 3, as for unreadable images.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torchtool.core import runtime
from torchtool.core.evaluate.config import OUTPUTS, EvalConfig
from torchtool.core.evaluate.results import append_results, check_results_file, result_row
from torchtool.core.evaluate.run import check_options, evaluate_model
from torchtool.core.output import TorchtoolError, UsageError, warn


def _check_many(cfg: EvalConfig, checkpoints: list[str]) -> None:
    """One model's files (and options that only make sense for one) are refused, said in one line."""
    single = [OUTPUTS[k][0] for k in OUTPUTS if getattr(cfg, OUTPUTS[k][1])]
    single += [o for o, v in (("--compare", cfg.compare), ("--weights", cfg.weights),
                              ("--predictions", cfg.predictions), ("--bootstrap", cfg.bootstrap or None)) if v is not None]
    if single:
        raise UsageError(f"{', '.join(single)} belong{'s' if len(single) == 1 else ''} to one model: give one "
                         f"checkpoint, not {len(checkpoints)}",
                         hint="--results-file FILE.csv collects one row per checkpoint")
    missing = [c for c in checkpoints if not Path(c).expanduser().is_file()]
    if missing:
        raise UsageError(f"no such checkpoint: {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
    if len(set(checkpoints)) < len(checkpoints):
        raise UsageError("a checkpoint is named twice")


def evaluate_many(cfg: EvalConfig, checkpoints: list[str]) -> list[dict[str, Any]]:
    """Each checkpoint on its own data (its validation images, or --data): one result row each, in order.

    The rows are appended to --results-file as they come (a long sweep keeps what it finished).
    """
    _check_many(cfg, checkpoints)
    check_options(replace(cfg, checkpoint=checkpoints[0]))
    results = check_results_file(cfg.results_file) if cfg.results_file else None
    rows = []
    with runtime.distributed(cfg.device) as dist:
        for checkpoint in checkpoints:
            try:
                report = evaluate_model(replace(cfg, checkpoint=checkpoint), dist, {}, prefix=f"{checkpoint}: ")
                row = result_row(checkpoint, report)
                if report["skipped"]:
                    row["error"] = f"{len(report['skipped'])} unreadable images left out"
            except TorchtoolError as exc:  # this one is reported in its row; the others go on
                row = result_row(checkpoint, error=exc.message)
                warn(f"{checkpoint}: {exc.message}")
            rows.append(row)
            if results and dist.is_main:
                append_results(results, [row])
    return rows
