"""``--html``: the whole report as one self-contained page.

Inline CSS, no script, nothing fetched: the pictures are ``data:image/png;base64`` URIs, so
the file can be attached to a pull request or a lab notebook and opened anywhere offline.
Every name from the data (classes, paths) is drawn as plain text (:func:`plots.shown_name`)
and escaped.
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any

from torchtool.core.evaluate.plots import shown_name
from torchtool.core.evaluate.report import report_rows, summary_lines
from torchtool.core.files import atomic_write_text

# (section id, heading, what the picture shows); the pictures' keys are the section ids
PICTURES = (("confusion", "Confusion matrix", "row-normalised: each row is one true class"),
            ("calibration", "Reliability diagram", "accuracy against confidence in the ECE's 15 bins"),
            ("gallery", "Highest losses", "the images the model got most wrong, highest loss first"))
LABELS = {"ece": "ECE (15 bins)", "loss": "loss (mean cross-entropy)", "macro_f1": "macro F1",
          "macro_auc": "macro ROC-AUC", "macro_ap": "macro average precision"}
LISTED = 20  # paths listed per side for images in one model's predictions only

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da;
        --good: #1a7f37; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 0; color: var(--muted); }
nav { margin: 12px 0 8px; display: flex; gap: 14px; flex-wrap: wrap; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; }
section { margin-top: 28px; }
h3 { font-size: 15px; margin: 16px 0 8px; }
h2 { font-size: 18px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.caption { color: var(--muted); font-size: 13px; margin: 0 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px;
        background: var(--soft); }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.card .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .ci { font-size: 12px; color: var(--muted); font-variant-numeric: tabular-nums; }
.notes { color: var(--muted); font-size: 13px; margin: 10px 0 0; padding-left: 18px; }
.pictures { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.pictures section { flex: 1 1 480px; margin-top: 28px; }
img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
.scroll { max-height: 75vh; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; width: 100%; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: var(--soft); position: sticky; top: 0; font-weight: 600; }
td.num, th.num { text-align: right; }
td.name { white-space: pre; max-width: 28ch; overflow: hidden; text-overflow: ellipsis; }
td.muted { color: var(--muted); font-size: 12.5px; white-space: normal; }
tr.total td { font-weight: 600; background: var(--soft); }
tbody tr:hover td { background: #eef4fb; }
.up { color: var(--good); } .down { color: var(--bad); }
table.small { width: auto; }
details { margin-top: 8px; font-size: 13px; } details li { white-space: pre; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def write_html(path: str | os.PathLike, report: dict[str, Any], pictures: dict[str, bytes],
               comparison: dict[str, Any] | None = None, *, title: str = "Evaluation report") -> None:
    """The page, written atomically: summary, comparison (when given), the pictures in ``pictures``
    ("confusion", "calibration", "gallery": PNG bytes; a missing one leaves its section out), the
    per-class table."""
    from torchtool import __version__

    body = [_summary(report)]
    if comparison is not None:
        body.append(_comparison(comparison))
    shown = [(key, head, note) for key, head, note in PICTURES if pictures.get(key)]
    # the two small pictures side by side where the window is wide enough; the gallery below
    body.append('<div class="pictures">' + "".join(_picture(k, h, n, pictures[k]) for k, h, n in shown
                                                   if k != "gallery") + "</div>")
    body += [_picture(k, h, n, pictures[k]) for k, h, n in shown if k == "gallery"]
    body.append(_per_class(report))
    links = [("summary", "Summary")] + ([("comparison", "Comparison")] if comparison is not None else [])
    links += [(k, h) for k, h, _ in shown] + [("per-class", "Per class")]
    nav = "".join(f'<a href="#{k}">{h}</a>' for k, h in links)
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_text(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{_text(title)}</h1>"
            f"<p>{_count(report['images'], 'image')}, {_count(report['classes'], 'class')}</p>"
            f"<nav>{nav}</nav></header>\n" + "\n".join(body) +
            f"\n<footer>torchtool {_text(__version__)} evaluate</footer>\n</main>\n</body>\n</html>\n")
    atomic_write_text(path, page)


def _text(value: Any) -> str:
    """Any value as escaped plain text: a name's odd bytes and control characters as visible escapes."""
    return html.escape(shown_name(str(value)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _summary(report: dict[str, Any]) -> str:
    """One card per figure of the table's summary (with its 95% interval when the report has one)."""
    lines = dict(summary_lines(report))
    macro = report["averages"]["macro"]["f1"]
    lines.setdefault("macro_f1", round(macro, 4))
    ranking = report.get("ranking") or {}
    for key in ("auc", "ap"):
        value = (ranking.get("macro") or {}).get(key)
        if value is not None:
            lines.setdefault(f"macro_{key}", round(value, 4))
    cards = []
    for key, value in lines.items():
        if value is None:
            continue
        shown, _, interval = _num(value).partition(" [")  # "0.8528 [0.8161, 0.8861]": the value, its interval
        ci = f'<div class="ci">95% CI [{_text(interval)}</div>' if interval else ""
        label = LABELS.get(key, key.replace("_", " "))
        cards.append(f'<div class="card"><div class="k">{_text(label)}</div>'
                     f'<div class="v">{_text(shown)}</div>{ci}</div>')
    ci = report.get("ci")
    notes = list(report.get("notes") or [])
    if ci:
        notes.append(f"intervals: 95% percentile bootstrap, {ci['resamples']} resamples of the images, "
                     f"seed {ci['seed']}")
    listed = "".join(f"<li>{_text(n)}</li>" for n in notes)
    return (f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>'
            + (f'<ul class="notes">{listed}</ul>' if listed else "") + "</section>")


def _picture(key: str, heading: str, note: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<section id="{key}"><h2>{heading}</h2><p class="caption">{note}</p>'
            f'<img src="data:image/png;base64,{data}" alt="{heading}"></section>')


def _table(header: list[tuple[str, str]], rows: list[str], css: str = "") -> str:
    head = "".join(f'<th class="{c}">{_text(h)}</th>' for h, c in header)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _per_class(report: dict[str, Any]) -> str:
    """The spreadsheet's rows (``report_rows``: per class, then All/Macro/Weighted), the most-confused
    classes in one cell."""
    rows = report_rows(report)
    figures = [c for c in rows[0] if c not in ("class", "label", "support") and not c.startswith("confused_")]
    header = [("class", ""), ("label", "num"), ("support", "num")] + [(c, "num") for c in figures]
    header.append(("most often taken for", ""))
    out = []
    for row in rows:
        total = row["label"] == ""  # All, Macro, Weighted (a class may be *named* "All")
        cells = [f'<td class="name">{_text(row["class"])}</td>', f'<td class="num">{_text(row["label"])}</td>',
                 f'<td class="num">{_text(row["support"])}</td>']
        cells += [f'<td class="num">{_text(_num(row[c]))}</td>' for c in figures]
        confused = [row[c] for c in row if c.startswith("confused_") and row[c]]
        cells.append(f'<td class="muted">{_text(", ".join(confused))}</td>')
        out.append(("<tr class=\"total\">" if total else "<tr>") + "".join(cells) + "</tr>")
    classes = _count(len(report["per_class"]), "class")
    return (f'<section id="per-class"><h2>Per class</h2><p class="caption">{classes}; '
            f'All is the micro average (= accuracy)</p><div class="scroll">{_table(header, out)}</div></section>')


def _delta(value: float | None) -> str:
    if value is None:
        return "<td></td>"
    css = "up" if value > 0 else "down" if value < 0 else ""
    return f'<td class="num {css}">{value:+.4f}</td>'


def _comparison(comp: dict[str, Any]) -> str:
    """Two models on the same images: overall and per-class deltas, the right/wrong pairs, McNemar's p."""
    names = comp.get("names") or ("A", "B")
    a, b = (_text(n) for n in names)
    overall = [f'<tr><td>{label}</td><td class="num">{comp[key]["a"]:.4f}</td><td class="num">'
               f'{comp[key]["b"]:.4f}</td>{_delta(comp[key]["delta"])}</tr>'
               for key, label in (("accuracy", "accuracy"), ("macro_recall", "macro recall"), ("macro_f1", "macro F1"))
               if comp.get(key)]
    overall_table = _table([("", ""), (names[0], "num"), (names[1], "num"), ("delta", "num")], overall, "small")
    m = comp["mcnemar"]
    pairs = [f'<tr><th>{a} right</th><td class="num">{m["both_right"]}</td><td class="num">{m["a_only"]}</td></tr>',
             f'<tr><th>{a} wrong</th><td class="num">{m["b_only"]}</td><td class="num">{m["both_wrong"]}</td></tr>']
    per_class = [f'<tr><td class="name">{_text(r["class"])}</td><td class="num">{r["support"]}</td>'
                 f'<td class="num">{_num(r["recall_a"])}</td><td class="num">{_num(r["recall_b"])}</td>'
                 f'{_delta(r["delta_recall"])}<td class="num">{_num(r["f1_a"])}</td>'
                 f'<td class="num">{_num(r["f1_b"])}</td>{_delta(r["delta_f1"])}</tr>' for r in comp["per_class"]]
    left_out = "".join(
        f"<details><summary>{_count(len(comp[key]), 'image')} only in {name}'s predictions: left out</summary><ul>"
        + "".join(f"<li>{_text(p)}</li>" for p in comp[key][:LISTED])
        + ("<li>…</li>" if len(comp[key]) > LISTED else "") + "</ul></details>"
        for key, name in (("only_a", a), ("only_b", b)) if comp.get(key))
    return (f'<section id="comparison"><h2>Comparison: {a} vs {b}</h2>'
            f'<p class="caption">{_count(comp["images"], "image")} in both, matched by path; delta = {b} − {a}</p>'
            f'<div class="pictures"><div>{overall_table}</div>'
            f'<div><table class="small"><thead><tr><th></th><th class="num">{b} right</th>'
            f'<th class="num">{b} wrong</th></tr></thead><tbody>{"".join(pairs)}</tbody></table>'
            f'<p class="caption">exact McNemar test on the {m["a_only"] + m["b_only"]} discordant pairs: '
            f'p = {m["p_value"]:.4g}</p></div></div>{left_out}'
            f'<h3>Per class</h3><div class="scroll">'
            + _table([("class", ""), ("support", "num"), (f"recall {names[0]}", "num"), (f"recall {names[1]}", "num"),
                      ("Δ recall", "num"), (f"F1 {names[0]}", "num"), (f"F1 {names[1]}", "num"), ("Δ F1", "num")],
                     per_class)
            + "</div></section>")
