"""What a person looks at during a finetune run: metrics.csv, curves.png, TensorBoard, one line per epoch."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torchtool.core.files import atomic_write
from torchtool.core.output import warn
from torchtool.core.train.plots import plot_curves

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "seconds")
EMA_COLUMNS = ("ema_val_loss", "ema_val_acc", "ema_val_top5")  # with --ema, after val_top5
TENSORBOARD_HINT = "tensorboard is not installed, so no event files: pip install tensorboard " \
                   "(metrics.csv and curves.png are written anyway)"


def tensorboard_available() -> bool:
    """True when torch.utils.tensorboard can write event files."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class RunLog:
    """Writes OUT/metrics.csv (appended and flushed every epoch), OUT/curves.png and TensorBoard events.

    ``history`` is the checkpoint's record of finished epochs: on resume the CSV is rewritten
    from it first, so rows from epochs that never reached a checkpoint disappear.
    """

    def __init__(self, out: Path, history: Sequence[Mapping[str, Any]], epochs: int, *, ema: bool = False,
                 tensorboard: bool = False, quiet: bool = False, top_k: int = 5):
        self.out, self.epochs, self.quiet = out, epochs, quiet
        self.top = f"top{top_k}"  # val_top5 counts the top min(5, classes): the line names what it counted
        self.columns = COLUMNS[:6] + EMA_COLUMNS + COLUMNS[6:] if ema else COLUMNS
        self.history = [dict(row) for row in history]
        self.csv_path, self.curves_path = out / "metrics.csv", out / "curves.png"
        with atomic_write(self.csv_path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, self.columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.history)
        self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._csv, self.columns, extrasaction="ignore", lineterminator="\n")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=len(self.history) + 1)

    def epoch(self, row: dict[str, Any], started: float | None = None) -> None:
        """Record one finished epoch everywhere; ``started`` (perf_counter) makes row["seconds"] whole."""
        self.history.append(row)
        plot_curves(self.history, self.curves_path)
        if started is not None:  # the epoch's wall time, its checkpoint and this plot included
            row["seconds"] = time.perf_counter() - started
        self._writer.writerow(row)
        self._csv.flush()
        os.fsync(self._csv.fileno())
        if self.tb is not None:
            for key in self.columns[1:]:  # train/loss, val/acc, ema_val/acc, ...
                self.tb.add_scalar(key[::-1].replace("_", "/", 1)[::-1], row[key], row["epoch"])
            self.tb.flush()
        if not self.quiet:
            ema = (f"  ema loss {row['ema_val_loss']:.4f} acc {row['ema_val_acc']:.4f} {self.top} "
                   f"{row['ema_val_top5']:.4f}"
                   if "ema_val_acc" in row else "")
            warn(f"epoch {row['epoch']}/{self.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                 f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} {self.top} {row['val_top5']:.4f}{ema}  "
                 f"lr {row['lr']:.3g}  {row['seconds']:.1f}s")

    def close(self) -> None:
        self._csv.close()
        if self.tb is not None:
            self.tb.close()
