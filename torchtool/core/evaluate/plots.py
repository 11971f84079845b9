"""The confusion matrix as a picture (matplotlib, headless), normalised by row."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from torchtool.core.files import atomic_save

MAX_SHOWN = 50  # past this many classes the names are unreadable: the most-confused ones are shown


def shown_name(name: str) -> str:
    """A class name as it can be drawn: a byte that is not UTF-8 as ``\\xe9``, a control character as ``\\n``."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def shown_classes(matrix: np.ndarray, limit: int = MAX_SHOWN) -> list[int]:
    """All classes, or the ``limit`` with the most confusions (off-diagonal counts in their row and column)."""
    n = len(matrix)
    if n <= limit:
        return list(range(n))
    off = matrix - np.diag(np.diag(matrix))
    score = off.sum(axis=0) + off.sum(axis=1)
    return sorted(np.argsort(-score, kind="stable")[:limit].tolist())


def plot_confusion(report: dict[str, Any], path: str | os.PathLike) -> list[str]:
    """A heatmap of the row-normalised confusion matrix with class names on both axes; written atomically.

    Returns, in our words, what the picture could not show as written (glyphs the font lacks).
    """
    from matplotlib import rc_context

    # plain text whatever the user's matplotlibrc says (text.usetex would need LaTeX for every label);
    # matplotlib warns once per missing glyph: said once, by the caller
    with rc_context({"text.usetex": False}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = _figure(report)
        atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    if any("missing from font" in str(w.message) for w in caught):
        return [f"some class names in {path} have characters the font cannot draw: they show as boxes"]
    return []


def _figure(report: dict[str, Any]) -> Any:
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
    labels = [shown_name(names[i]) for i in keep]
    # names are drawn as written: a "$" in one starts no mathtext
    ax.set_xticks(ticks, labels, rotation=90, fontsize=font, parse_math=False)
    ax.set_yticks(ticks, labels, fontsize=font, parse_math=False)
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
    return fig
