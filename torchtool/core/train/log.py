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

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
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

    def __init__(self, out: Path, history: Sequence[Mapping[str, Any]], epochs: int, *, tensorboard: bool = False,
                 quiet: bool = False):
        self.out, self.epochs, self.quiet = out, epochs, quiet
        self.history = [dict(row) for row in history]
        self.csv_path, self.curves_path = out / "metrics.csv", out / "curves.png"
        with atomic_write(self.csv_path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.history)
        self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._csv, COLUMNS, extrasaction="ignore", lineterminator="\n")
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
            for key in COLUMNS[1:]:
                self.tb.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])  # train/loss, val/acc, ...
            self.tb.flush()
        if not self.quiet:
            warn(f"epoch {row['epoch']}/{self.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                 f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.3g}  {row['seconds']:.1f}s")

    def close(self) -> None:
        self._csv.close()
        if self.tb is not None:
            self.tb.close()
