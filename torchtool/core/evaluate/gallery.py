"""``--gallery``: the images the model got most wrong, as a grid of captioned thumbnails.

:func:`top_losses` picks them (the highest per-image cross-entropy, as fastai's
``plot_top_losses``); :func:`plot_gallery` draws them, reading each image again from its
path. Written like the other pictures (:mod:`~torchtool.core.evaluate.plots`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from torchtool.core.evaluate.plots import Target, save_png, shown_name
from torchtool.core.evaluate.report import Predictions
from torchtool.core.output import UsageError

THUMB = 160  # pixels, the longer side of a thumbnail
NAME_CHARS = 22  # a caption line past this is cut: tiles stay one width


def top_losses(losses: np.ndarray, n: int, labels: np.ndarray, predictions: np.ndarray,
               classes: Iterable[int] | None = None) -> np.ndarray:
    """The indices of the ``n`` highest losses, highest first (ties: the lower index first).

    ``classes`` (label indices) keeps only mistakes involving one of them, as the true or the
    predicted class. An image whose loss is not a number is never chosen.
    """
    losses = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(losses)
    if classes is not None:
        wanted = np.asarray(list(classes), dtype=np.int64)
        labels, predictions = np.asarray(labels), np.asarray(predictions)
        keep &= (labels != predictions) & (np.isin(labels, wanted) | np.isin(predictions, wanted))
    candidates = np.flatnonzero(keep)
    order = np.argsort(-losses[candidates], kind="stable")  # stable: equal losses keep index order
    return candidates[order[:max(n, 0)]]


def plot_gallery(preds: Predictions, losses: np.ndarray, indices: np.ndarray, path: Target,
                 *, source: str = "the prediction file") -> list[str]:
    """A grid of the images at ``indices`` (in that order), each captioned true / predicted class,
    the predicted probability and the loss; an image that cannot be read is a grey tile saying why."""
    if not preds.paths or not any(preds.paths):
        raise UsageError(f"{source} has no image paths: no --gallery",
                         hint="a prediction file needs a path column for the gallery")
    tiles = [_tile(preds, losses, int(i)) for i in indices]
    return save_png(lambda: _figure(tiles), path)


def _thumbnail(where: str) -> tuple[np.ndarray | None, str]:
    """The image at ``where`` shrunk to a thumbnail, or None and the reason it cannot be read."""
    from PIL import Image

    from torchtool.core.data.images import DecodeFloor, describe_error, load_image

    if not where:
        return None, "no path"
    try:
        # a reduced JPEG decode is plenty for a thumbnail (what PIL's thumbnail() does)
        image = load_image(where, decode=DecodeFloor(THUMB))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, describe_error(exc)
    image.thumbnail((THUMB, THUMB))
    return np.asarray(image), ""


def _cut(text: str) -> str:
    text = shown_name(text)
    return text if len(text) <= NAME_CHARS else text[:NAME_CHARS - 1] + "\u2026"


def _tile(preds: Predictions, losses: np.ndarray, i: int) -> dict[str, Any]:
    """What one tile shows: the thumbnail (or why not), its caption, whether the model was right."""
    y, p = int(preds.labels[i]), int(preds.predictions[i])
    probs = preds.probs
    score = preds.scores[i] if preds.scores is not None else probs[i, p] if probs is not None else math.nan
    pixels, why = _thumbnail(preds.paths[i])
    caption = (f"true: {_cut(preds.classes[y])}\npred: {_cut(preds.classes[p])}\n"
               f"p {score:.3f}   loss {float(losses[i]):.3f}")
    return {"pixels": pixels, "why": why, "caption": caption, "right": y == p}


def _figure(tiles: list[dict[str, Any]]) -> Any:
    from matplotlib.figure import Figure

    n = max(len(tiles), 1)
    cols = max(1, min(n, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.1 * cols, 2.55 * rows))  # inches a tile: the image and 3 lines of caption
    # one axes per tile placed by hand (a grid of subplots costs twice the time to build): rows 0.45 and
    # columns 0.08 of a tile apart, 0.02 of the figure at the edges, room for the first captions on top
    top, hspace, wspace = 1 - 0.6 / (2.55 * rows), 0.45, 0.08
    h = (top - 0.02) / (rows + hspace * (rows - 1))
    w = 0.96 / (cols + wspace * (cols - 1))
    axes = []
    for i in range(n):
        r, c = divmod(i, cols)
        ax = fig.add_axes((0.02 + c * w * (1 + wspace), top - (r + 1) * h - r * h * hspace, w, h))
        ax.set_axis_off()
        axes.append(ax)
    for ax, tile in zip(axes, tiles):
        if tile["pixels"] is not None:
            ax.imshow(tile["pixels"])  # antialiased: a small image shows its own pixels, a large one no moire
            # a square window around the image: every tile the same size, the captions in one line
            h, w = tile["pixels"].shape[:2]
            side = max(h, w)
            ax.set_xlim((w - side) / 2 - 0.5, (w + side) / 2 - 0.5)
            ax.set_ylim((h + side) / 2 - 0.5, (h - side) / 2 - 0.5)
        else:  # the tile still says which image it was: only the picture is missing
            ax.imshow(np.full((THUMB, THUMB, 3), 200, np.uint8))
            ax.text(THUMB / 2, THUMB / 2, "unreadable:\n" + _wrap(tile["why"]), ha="center", va="center",
                    fontsize=7, color="#333333", parse_math=False)
        # names are drawn as written: a "$" in one starts no mathtext
        ax.set_title(tile["caption"], fontsize=7.5, loc="left", parse_math=False,
                     color="#1a7f37" if tile["right"] else "#b42318")
    if not tiles:
        axes[0].text(0.5, 0.5, "no image to show", ha="center", va="center", transform=axes[0].transAxes)
    return fig


def _wrap(text: str, width: int = 24) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(shown_name(text), width)[:4])
