"""The confusion matrix as a picture (matplotlib, headless), normalised by row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from torchtool.core.files import atomic_save

MAX_SHOWN = 50  # past this many classes the names are unreadable: the most-confused ones are shown


def shown_classes(matrix: np.ndarray, limit: int = MAX_SHOWN) -> list[int]:
    """All classes, or the ``limit`` with the most confusions (off-diagonal counts in their row and column)."""
    n = len(matrix)
    if n <= limit:
        return list(range(n))
    off = matrix - np.diag(np.diag(matrix))
    score = off.sum(axis=0) + off.sum(axis=1)
    return sorted(np.argsort(-score, kind="stable")[:limit].tolist())


def plot_confusion(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A heatmap of the row-normalised confusion matrix with class names on both axes; written atomically."""
    from matplotlib.figure import Figure

    matrix = np.asarray(report["confusion_matrix"], dtype=np.float64)
    names = report["class_names"]
    keep = shown_classes(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    normed = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)[np.ix_(keep, keep)]
    n = len(keep)
    side = min(max(4.0, 0.28 * n + 2.5), 18.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(normed, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(n)
    font = 8 if n <= 20 else max(4, int(8 - (n - 20) / 10))
    ax.set_xticks(ticks, [names[i] for i in keep], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [names[i] for i in keep], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 15:  # room for the numbers themselves
        for i in range(n):
            for j in range(n):
                if normed[i, j] > 0:
                    ax.text(j, i, f"{normed[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if normed[i, j] > 0.5 else "black")
    total = len(matrix)
    title = (f"confusion matrix (accuracy {report['accuracy']:.4f})" if n == total else
             f"the {n} most-confused of {total} classes (accuracy {report['accuracy']:.4f})")
    ax.set_title(title)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)
