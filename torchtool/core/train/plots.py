"""Learning curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torchtool.core.files import atomic_save


def _plain_log_formatter(**kwargs: Any) -> Any:
    """matplotlib's LogFormatter (which labels minor ticks when the range is short), as 0.2 rather than 2e-01."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return f"{x:g}"

    return PlainLog(**kwargs)


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Loss, accuracy and learning rate by epoch, side by side; written atomically."""
    # A bare Figure (no pyplot) renders through Agg: headless, no window, no global state, and
    # it is freed with its last reference (pyplot's figure registry would keep it alive).
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 3.8))
    # Fixed margins: a layout engine would cost a third of the ~0.3 s this takes every epoch.
    fig.subplots_adjust(left=0.05, right=0.985, bottom=0.14, top=0.91, wspace=0.25)
    loss, acc, lr = fig.subplots(1, 3)
    for ax, key, title in ((loss, "loss", "loss"), (acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train", ms=3)
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label="validation", ms=3)
        if any(f"ema_val_{key}" in r for r in history):  # --ema: the average's validation beside the weights'
            ax.plot(epochs, [r.get(f"ema_val_{key}", math.nan) for r in history], "o--", label="validation (EMA)", ms=3)
        ax.set_title(title)
        ax.legend()
    losses = [v for r in history for v in (r["train_loss"], r["val_loss"]) if math.isfinite(v)]
    if losses and min(losses) > 0:  # a loss of 0 (or none at all) has no place on a log axis
        loss.set_yscale("log")  # losses fall by orders of magnitude; a linear axis flattens all but the start
        # Plain-text tick labels: matplotlib's default 10^x labels go through mathtext, whose parser keeps
        # exceptions (and with them the caller's frames, the training loop's included) alive until a GC.
        loss.yaxis.set_major_formatter(_plain_log_formatter())
        loss.yaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    lr.plot(epochs, [r["lr"] for r in history], "o-", color="tab:green", ms=3)
    lr.set_title("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (loss, acc, lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    return Path(path)
