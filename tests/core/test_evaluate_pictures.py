"""evaluate's pictures and page: the gallery's choice and tiles, the reliability diagram's bars, the HTML page."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
from PIL import Image

from torchtool.core.evaluate import gallery, plots
from torchtool.core.evaluate.gallery import plot_gallery, top_losses
from torchtool.core.evaluate.html import write_html
from torchtool.core.evaluate.plots import plot_calibration, plot_confusion, png_bytes
from torchtool.core.evaluate.report import Predictions, build_report
from torchtool.core.output import UsageError

# names that would start mathtext, LaTeX, an escape or break a line or a tag, if drawn or written as given
ODD = ["$\\frac$", "a_b^c", "back\\slash", "tab\there", "<b>x</b> & \"q\"", "latin\udce9"]


def _solid(tmp_path, n):
    """n images, each one solid colour nobody else has: a tile in the picture says which image it is."""
    colours = [((37 * i) % 256, (255 - 53 * i) % 256, (90 + 71 * i) % 256) for i in range(n)]
    paths = []
    for i, colour in enumerate(colours):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.new("RGB", (48 + 8 * i, 40), colour).save(paths[-1])
    return colours, paths


def _predictions(n, classes, paths=None, seed=0):
    rng = np.random.default_rng(seed)
    c = len(classes)
    labels = np.arange(n) % c
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds = probs.argmax(1)
    out = Predictions(list(classes), labels, preds, probs[np.arange(n), preds], paths)
    losses = -np.log(probs[np.arange(n), labels])
    return out, losses, probs.astype(np.float32)


def _drawn(monkeypatch, module):
    """The Figures a picture function builds, kept for a look at what was drawn."""
    figures = []
    real = module.save_png

    def keep(build, path):
        return real(lambda: figures.append(build()) or figures[-1], path)

    monkeypatch.setattr(module, "save_png", keep)
    return figures


def test_top_losses_are_exactly_the_highest_losses_ties_by_index():
    rng = np.random.default_rng(1)
    losses = rng.integers(0, 6, 40).astype(np.float64)  # many ties
    losses[7] = np.nan  # never chosen
    labels, predictions = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
    by_hand = sorted((i for i in range(40) if not np.isnan(losses[i])), key=lambda i: (-losses[i], i))
    assert top_losses(losses, 10, labels, predictions).tolist() == by_hand[:10]
    assert top_losses(losses, 100, labels, predictions).tolist() == by_hand  # n past the images: all of them
    # mistakes involving class 1 or 3 (as the true or the predicted class); right answers never
    involved = [i for i in by_hand if labels[i] != predictions[i] and {labels[i], predictions[i]} & {1, 3}]
    assert top_losses(losses, 5, labels, predictions, classes=[1, 3]).tolist() == involved[:5]
    assert len(involved) > 5 and top_losses(losses, 0, labels, predictions).tolist() == []


def test_the_gallery_draws_the_chosen_images_in_order_with_plain_captions(tmp_path, monkeypatch):
    colours, paths = _solid(tmp_path, 9)
    preds, losses, _ = _predictions(9, ODD, paths)
    paths[4] = str(tmp_path / "gone.png")  # unreadable: a grey tile instead
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths[5] = str(tmp_path / "bad.png")
    losses[[4, 5]] = 9.0, 8.0  # both shown, first
    chosen = top_losses(losses, 7, preds.labels, preds.predictions)
    assert chosen[:2].tolist() == [4, 5]
    figures = _drawn(monkeypatch, gallery)
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)  # a user's matplotlibrc: no LaTeX is run
    assert plot_gallery(preds, losses, chosen, tmp_path / "g.png") == []
    picture = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    assert picture.shape == (3 * 255, 3 * 210, 3)  # 7 tiles: 3 columns, 3 rows of 2.1 x 2.55 in at 100 dpi
    # each readable chosen image shows as one patch of its colour, in reading order; the others not at all
    centres = []
    for i in range(9):
        patch = np.argwhere((np.abs(picture - colours[i]) <= 2).all(axis=2))
        readable = i not in (4, 5)
        assert (len(patch) > 2000) == (i in chosen and readable), i
        if i in chosen and readable:
            centres.append((int(np.where(chosen == i)[0][0]), *patch.mean(axis=0)))
    cols = 3
    for slot, y, x in centres:
        assert int(y // 255) == slot // cols and int(x // 210) == slot % cols
    grey = np.argwhere((picture == 200).all(axis=2))  # the grey tiles saying why, in the first two slots
    assert len(grey) > 2 * 10000 and set(grey[:, 0] // 255) == {0} and set(grey[:, 1] // 210) == {0, 1}
    titles = [ax.get_title(loc="left") for ax in figures[0].axes if ax.get_title(loc="left")]
    expected = [f"true: {plots.shown_name(ODD[preds.labels[i]])}\npred: {plots.shown_name(ODD[preds.predictions[i]])}"
                f"\np {preds.scores[i]:.3f}   loss {losses[i]:.3f}" for i in chosen]
    assert titles == expected  # the names as written: "$\frac$" drew no mathtext (it would have raised)
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    assert "unreadable:\nfile not found" in texts


def test_a_gallery_needs_image_paths(tmp_path):
    preds, losses, _ = _predictions(4, ["a", "b"])
    with pytest.raises(UsageError, match="^preds.csv has no image paths: no --gallery$"):
        plot_gallery(preds, losses, np.arange(2), tmp_path / "g.png", source="preds.csv")
    assert not (tmp_path / "g.png").exists()


CALIBRATION = {"bins": 15, "edges": np.linspace(0, 1, 16).tolist(),
               "count": [0] * 6 + [3, 0, 5, 2, 0, 0, 7, 11, 40],
               "confidence": [None] * 6 + [0.43, None, 0.56, 0.62, None, None, 0.84, 0.9, 0.98],
               "accuracy": [None] * 6 + [1 / 3, None, 0.4, 1.0, None, None, 5 / 7, 9 / 11, 0.95]}


def test_the_reliability_diagram_draws_the_reports_bins(tmp_path, monkeypatch):
    report = {"calibration": CALIBRATION, "ece": 0.0123}
    figures = _drawn(monkeypatch, plots)
    assert plot_calibration(report, tmp_path / "c.png") == []
    assert Image.open(tmp_path / "c.png").size == (520, 590)
    top, bottom = figures[0].axes
    bars = [p for p in top.patches if p.get_gid() == "accuracy"]
    filled = [k for k, n in enumerate(CALIBRATION["count"]) if n]
    assert [round(b.get_x(), 9) for b in bars] == [round(CALIBRATION["edges"][k], 9) for k in filled]
    assert [b.get_height() for b in bars] == pytest.approx([CALIBRATION["accuracy"][k] for k in filled])
    assert bars[0].get_width() == pytest.approx(1 / 15)
    gaps = [p for p in top.patches if p.get_gid() == "gap"]  # from the accuracy up (or down) to the mean confidence
    assert [g.get_y() + g.get_height() for g in gaps] == pytest.approx([CALIBRATION["confidence"][k] for k in filled])
    counts = [p.get_height() for p in bottom.patches if p.get_gid() == "count"]
    assert counts == CALIBRATION["count"]
    assert top.get_title() == "reliability diagram (ECE = 0.0123)"
    with pytest.raises(UsageError, match="no scores: no calibration plot"):
        plot_calibration({"calibration": None, "ece": None}, tmp_path / "none.png")


def test_png_bytes_are_the_picture_a_file_would_hold(tmp_path):
    report = build_report(Predictions(["\u4e2d\u6587", "b"], np.array([0, 1, 1]), np.array([0, 1, 0])))
    data, notes = png_bytes(plot_confusion, report)
    assert plot_confusion(report, tmp_path / "cm.png") == [
        f"some class names in {tmp_path / 'cm.png'} have characters the font cannot draw: they show as boxes"]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(data)).size == Image.open(tmp_path / "cm.png").size
    assert notes == ["some class names in the picture have characters the font cannot draw: they show as boxes"]
    assert png_bytes(plot_confusion, report, name="out/cm.png")[1] == [
        "some class names in out/cm.png have characters the font cannot draw: they show as boxes"]


class _Page(HTMLParser):
    """What a browser would see: element ids, images, scripts, table cells, text."""

    def __init__(self):
        super().__init__()
        self.ids, self.images, self.scripts, self.links, self.cells, self.text = [], [], 0, [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.images += [attrs["src"]] if tag == "img" else []
        self.scripts += tag == "script"
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and v]
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell += data


def _page(path) -> tuple[_Page, str]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    return page, text


def _comparison(preds):
    """stats.compare of ``preds`` against a second model right on three more images; one image in A only."""
    from torchtool.core.evaluate.stats import compare

    paths = [f"x/img{i}.png" for i in range(len(preds.labels))]
    better = preds.predictions.copy()
    wrong = np.flatnonzero(better != preds.labels)[:3]
    better[wrong] = preds.labels[wrong]
    a = Predictions(preds.classes, preds.labels, preds.predictions, preds.scores, paths)
    b = Predictions(preds.classes, preds.labels[1:], better[1:], preds.scores[1:], paths[1:])
    return compare(a, b, names=("base <a>", "new"))


def test_the_page_is_self_contained_and_holds_every_section(tmp_path):
    preds, losses, probs = _predictions(12, ODD)
    preds.probs = probs
    report = build_report(preds)
    report["ci"] = {"accuracy": [0.25, 0.75], "balanced_accuracy": [0.2, 0.7], "macro_f1": [0.1, 0.6],
                    "ece": [0.05, 0.3], "resamples": 200, "seed": 3}
    pictures = {"confusion": b"\x89PNG confusion", "calibration": b"\x89PNG calibration", "gallery": b"\x89PNG gallery"}
    comparison = _comparison(preds)
    write_html(tmp_path / "r.html", report, pictures, comparison, title="run <1>")
    page, text = _page(tmp_path / "r.html")
    for section in ("summary", "comparison", "confusion", "calibration", "gallery", "per-class"):
        assert page.ids.count(section) == 1, section
    assert page.scripts == 0 and "<script" not in text.lower()
    assert "http://" not in text and "https://" not in text  # nothing fetched
    assert all(link.startswith(("#", "data:image/png;base64,")) for link in page.links)
    assert [base64.b64decode(src.split(",", 1)[1]) for src in page.images] == list(pictures.values())
    # names are text, never markup: the tag-like class name is a cell's text, a control character shows as \t
    shown = [plots.shown_name(n) for n in ODD]
    assert shown[4] in page.cells and "tab\\there" in page.cells and "latin\\xe9" in page.cells
    assert "<b>x</b>" not in text and "<a>" not in text and "run <1>" in "".join(page.text)
    # one row per class, then All, Macro, Weighted: each class's recall as the report has it
    for row in report["per_class"]:
        at = len(page.cells) - 1 - page.cells[::-1].index(plots.shown_name(row["class"]))  # the last table's
        assert f"{row['recall']:.4f}" in page.cells[at:at + 8]
    assert {"All", "Macro"} <= set(page.cells)
    if "ranking" in report:  # the ranking figures as columns
        assert {"auc", "ap"} <= set(page.cells)
    assert "95% CI [0.2500, 0.7500]" in "".join(page.text)  # the summary's interval for accuracy
    # the comparison: its accuracies and delta, the right/wrong pairs, McNemar's p, the image left out
    words = "".join(page.text)
    acc = comparison["accuracy"]
    at = page.cells.index("accuracy")
    assert page.cells[at:at + 4] == ["accuracy", f"{acc['a']:.4f}", f"{acc['b']:.4f}", f"{acc['delta']:+.4f}"]
    assert acc["delta"] > 0 and "base <a> right" in page.cells and "new wrong" in page.cells
    assert f"p = {comparison['mcnemar']['p_value']:.4g}" in words and "x/img0.png" in page.cells + page.text


def test_missing_pictures_and_comparison_leave_their_sections_out(tmp_path):
    preds, _, _ = _predictions(6, ["a", "b", "c"])
    write_html(tmp_path / "r.html", build_report(preds), {"confusion": b"\x89PNG only"})
    page, _ = _page(tmp_path / "r.html")
    assert {"summary", "per-class", "confusion"} <= set(page.ids)
    assert not {"calibration", "gallery", "comparison"} & set(page.ids) and len(page.images) == 1
    assert "#gallery" not in page.links and "95% CI" not in "".join(page.text)
