"""The report's pictures (matplotlib, headless): the confusion matrix and the reliability diagram.

Every picture function takes ``path``: a file name, written atomically, or a binary file
object (``io.BytesIO``) the PNG is written into; it returns notes in our words (glyphs the
font lacks). :func:`png_bytes` gives any of them as PNG bytes and notes (what the HTML page
embeds). Names are drawn as plain text: :func:`shown_name`, no mathtext, no LaTeX.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from torchtool.core.files import atomic_save
from torchtool.core.output import UsageError

MAX_SHOWN = 50  # past this many classes the names are unreadable: the most-confused ones are shown
DPI = 100
Target = str | os.PathLike | IO[bytes]


def shown_name(name: str) -> str:
    """A class name as it can be drawn: a byte that is not UTF-8 as ``\\xe9``, a control character as ``\\n``."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def save_png(build: Callable[[], Any], path: Target) -> list[str]:
    """Build a matplotlib Figure with ``build()`` and write it as PNG to ``path``; returns the notes.

    Shared by every picture: built and drawn as plain text whatever the user's matplotlibrc says
    (text.usetex would need LaTeX for every label), a file written atomically.
    """
    from matplotlib import rc_context

    # matplotlib warns once per missing glyph: said once, by the caller
    with rc_context({"text.usetex": False}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = build()
        if hasattr(path, "write"):
            fig.savefig(path, format="png", dpi=DPI)
        else:
            atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    if any("missing from font" in str(w.message) for w in caught):
        where = getattr(path, "name", "the picture") if hasattr(path, "write") else path
        return [f"some class names in {where} have characters the font cannot draw: they show as boxes"]
    return []


def png_bytes(draw: Callable[..., list[str]], *args: Any, name: str | None = None) -> tuple[bytes, list[str]]:
    """``draw(*args, path)`` (any picture function here or in gallery) as PNG bytes and its notes;
    ``name``: the file the bytes are for, as the notes call it (else "the picture")."""
    buf = io.BytesIO()
    if name is not None:
        buf.name = name
    notes = draw(*args, buf)
    return buf.getvalue(), notes


def shown_classes(matrix: np.ndarray, limit: int = MAX_SHOWN) -> list[int]:
    """All classes, or the ``limit`` with the most confusions (off-diagonal counts in their row and column)."""
    n = len(matrix)
    if n <= limit:
        return list(range(n))
    off = matrix - np.diag(np.diag(matrix))
    score = off.sum(axis=0) + off.sum(axis=1)
    return sorted(np.argsort(-score, kind="stable")[:limit].tolist())


def plot_confusion(report: dict[str, Any], path: Target) -> list[str]:
    """A heatmap of the row-normalised confusion matrix with class names on both axes."""
    return save_png(lambda: _confusion_figure(report), path)


def _confusion_figure(report: dict[str, Any]) -> Any:
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


def plot_calibration(report: dict[str, Any], path: Target) -> list[str]:
    """The reliability diagram behind the ECE figure: per confidence bin of ``report["calibration"]``,
    the accuracy as a bar beside the diagonal (a perfectly calibrated model), the counts underneath."""
    if not report.get("calibration"):
        raise UsageError("the predictions have no scores: no calibration plot",
                         hint="a model run has them; a prediction file needs its score column")
    return save_png(lambda: _calibration_figure(report), path)


def _calibration_figure(report: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    cal = report["calibration"]
    edges = np.asarray(cal["edges"], dtype=np.float64)
    lo, width = edges[:-1], np.diff(edges)
    count = np.asarray(cal["count"], dtype=np.int64)
    filled = count > 0  # an empty bin has no accuracy: no bar rather than a zero one
    accuracy = np.array([a if a is not None else np.nan for a in cal["accuracy"]], dtype=np.float64)
    confidence = np.array([c if c is not None else np.nan for c in cal["confidence"]], dtype=np.float64)
    fig = Figure(figsize=(5.2, 5.9))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3.2, 1), "hspace": 0.08})
    # the gap to the bin's mean confidence (what the ECE adds up, weighted by the counts) under the bars,
    # the mean confidence itself as a line: an overconfident bin shows red above its bar
    gap = confidence[filled] - accuracy[filled]
    top.bar(lo[filled], gap, width[filled], bottom=accuracy[filled], align="edge", color="#f4b6b3",
            edgecolor="#e45756", linewidth=0.6, label="gap to mean confidence", gid="gap", zorder=1)
    top.bar(lo[filled], accuracy[filled], width[filled], align="edge", color="#4c78a8", edgecolor="white",
            label="accuracy", gid="accuracy", zorder=2)
    top.hlines(confidence[filled], lo[filled], lo[filled] + width[filled], color="#b42318", linewidth=1.6,
               label="mean confidence", zorder=3)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration", zorder=4)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    order = ("accuracy", "mean confidence", "gap to mean confidence", "perfect calibration")
    handles = dict(zip(*reversed(top.get_legend_handles_labels())))
    # above the plot: inside it, any corner can hide a bar
    top.legend([handles[k] for k in order], order, loc="lower left", bbox_to_anchor=(0, 1.01), ncols=2,
               fontsize=8, frameon=False, borderaxespad=0)
    ece = report.get("ece")
    top.set_title("reliability diagram" + ("" if ece is None else f" (ECE = {ece:.4f})"), pad=34)
    bottom.bar(lo, count, width, align="edge", color="#9d9d9d", edgecolor="white", gid="count")
    bottom.set_ylabel("images")
    bottom.set_xlabel("confidence (the predicted class's probability)")
    most = max(int(count.max(initial=0)), 1)
    if most > 20 * max(int(count[filled].min(initial=1)), 1):  # one full bin would flatten the rest
        bottom.set_yscale("log")
        bottom.set_ylabel("images (log)")
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.set_ylim(0.7, most * 3)
    else:
        bottom.set_ylim(0, most * 1.25)
    for x, w, k in zip(lo, width, count):
        if k:
            bottom.text(x + w / 2, k, str(k), ha="center", va="bottom", fontsize=6)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.87, bottom=0.09)
    return fig
