"""torchtool evaluate's insight (issue 27), end to end: preprocessing overrides, several checkpoints and
--results-file, the gallery, AUC/AP, the calibration plot, bootstrap intervals, --compare, the HTML page."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.commands.test_evaluate import model_calls  # noqa: F401 - the fixture, shared
from tests.conftest import GENEROUS_S
from tests.finetune_data import write_digits
from torchtool.cli import app
from torchtool.core.models.checkpoint import load_checkpoint

runner = CliRunner()
TRAIN = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "16",
         "--workers", "0", "--augment", "none", "--device", "cpu", "--epochs", "2", "--quiet"]
FAST = ["--workers", "0", "--device", "cpu", "--quiet"]
SCORED = ["--scores", "all"]


def invoke(*args, input=None):
    return runner.invoke(app, [*map(str, args)], input=input)


def report_of(*args) -> dict:
    result = invoke("evaluate", *args, "--json", *FAST)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error(result, code: int, text: str) -> None:
    """A usage error or failure said in one line, no traceback."""
    assert result.exit_code == code and text in result.stderr and "Traceback" not in result.stderr, result.output
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("torchtool: error:")]) == 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, a, b): 4 digits (5 validation images each) and two checkpoints trained with different seeds."""
    root = tmp_path_factory.mktemp("insight")
    data = write_digits(root / "data", labels=range(4), train_per_class=20, val_per_class=5)
    for name, seed in (("a", 0), ("b", 1)):
        result = invoke("finetune", data, "--out", root / name, *TRAIN, "--seed", seed)
        assert result.exit_code == 0, result.output
    return data, root / "a" / "best.pth", root / "b" / "best.pth"


def with_preprocess(checkpoint: Path, path: Path, **changes) -> Path:
    """A copy of ``checkpoint`` whose stored preprocessing says ``changes``."""
    state = load_checkpoint(checkpoint)
    state["preprocess"] = {**state["preprocess"], **changes}
    torch.save(state, path)
    return path


SAME = ("accuracy", "loss", "ece", "per_class", "confusion_matrix", "ranking", "calibration", "top_k")


# --- 0. preprocessing, several checkpoints, --results-file -------------------------------------------

def test_preprocessing_options_override_the_stored_one(runs, tmp_path):
    data, a, _ = runs
    stored = load_checkpoint(a)
    assert stored["preprocess"]["crop_size"] == 32
    # a bare state_dict gets the weights' preset (224 px); the options evaluate it as it was trained
    plain = tmp_path / "plain.pth"
    torch.save(stored["model"], plain)
    bare = ["--model", "mobilenet_v3_small", "--weights", plain, "--data", data / "val"]
    preset, as_trained, own = report_of(*bare), report_of(*bare, "--image-size", 32), report_of(a)
    assert preset["source"]["preprocess"]["crop_size"] == 224 and preset["loss"] != own["loss"]
    for key in SAME:
        assert as_trained[key] == own[key], key

    # every option: the report of a checkpoint whose stored preprocessing says so, and said once on stderr
    other = dict(crop_size=40, resize_size=48, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], interpolation="bicubic")
    copy = with_preprocess(a, tmp_path / "stored.pth", **other)
    stored_says = report_of(copy)
    flags = ["--image-size", 40, "--mean", "0.5,0.5,0.5", "--std", "0.25", "--interpolation", "bicubic"]
    for resize in (["--resize", 48], ["--crop-pct", "0.8333"]):  # 40 / 0.8333 -> 48
        result = invoke("evaluate", a, *flags, *resize, "--json", "--workers", "0", "--device", "cpu")
        assert result.exit_code == 0, result.output
        told = json.loads(result.stdout)
        assert told["source"]["preprocess"] == stored_says["source"]["preprocess"] == {**stored["preprocess"], **other}
        for key in SAME:
            assert told[key] == stored_says[key], key
        said = [ln for ln in result.stderr.splitlines() if "preprocessing" in ln]
        assert said == [f"torchtool: preprocessing of {a}: crop_size 32 -> 40, resize_size 37 -> 48, mean "
                        "0.485,0.456,0.406 -> 0.5,0.5,0.5, std 0.229,0.224,0.225 -> 0.25,0.25,0.25, interpolation "
                        "bilinear -> bicubic (the options override its own)"]
    one_error(invoke("evaluate", a, "--mean", "0.5,x", *FAST), 2, "--mean '0.5,x': expected three numbers")
    one_error(invoke("evaluate", "--predictions", tmp_path / "p.csv", "--image-size", 32), 2,
              "--predictions needs no model or images: leave out --image-size")


def test_several_checkpoints_give_one_row_each_and_append_to_the_results_file(runs, tmp_path):
    data, a, b = runs
    singles = [report_of(a), report_of(b)]
    results = tmp_path / "results.csv"
    many = invoke("evaluate", a, b, "--results-file", results, "--json", *FAST)
    assert many.exit_code == 0, many.output
    rows = json.loads(many.stdout)
    assert [r["checkpoint"] for r in rows] == [str(a), str(b)]
    for row, single in zip(rows, singles):
        assert row["images"] == single["images"] == 20 and row["error"] is None
        assert row["accuracy"] == round(single["accuracy"], 4) and row["loss"] == round(single["loss"], 4)
        assert row["macro_f1"] == round(single["averages"]["macro"]["f1"], 4)
        assert row["ece"] == round(single["ece"], 4) and row["top5"] == 1.0  # 4 classes: top-5 holds them all
        assert row["images_per_s"] > 0
    header = "checkpoint,accuracy,top5,macro_f1,ece,loss,images,images_per_s,error"
    assert results.read_text().splitlines()[0] == header
    # a single checkpoint appends too; the header stays once
    assert invoke("evaluate", a, "--results-file", results, *FAST).exit_code == 0
    lines = results.read_text().splitlines()
    assert lines.count(header) == 1 and len(lines) == 4
    saved = list(csv.DictReader(lines))
    assert [r["checkpoint"] for r in saved] == [str(a), str(b), str(a)]
    assert float(saved[2]["accuracy"]) == rows[0]["accuracy"] and saved[2]["error"] == ""
    # JSON: a list, extended
    as_json = tmp_path / "results.json"
    for _ in range(2):
        assert invoke("evaluate", a, b, "--results-file", as_json, *FAST).exit_code == 0
    assert [r["checkpoint"] for r in json.loads(as_json.read_text())] == [str(a), str(b)] * 2
    # the table: one row per checkpoint
    table = invoke("evaluate", a, b, *FAST)
    assert table.exit_code == 0 and table.stdout.split("\n")[0].split() == \
        ["checkpoint", "accuracy", "top5", "macro_f1", "ece", "loss", "images", "images_per_s"]


def test_several_checkpoints_refuse_one_models_files_and_keep_going_past_a_bad_one(runs, tmp_path, model_calls):
    data, a, b = runs
    one_error(invoke("evaluate", a, b, "--csv", tmp_path / "r.csv", "--gallery", tmp_path / "g.png", *FAST), 2,
              f"--csv, --gallery belong to one model: give one checkpoint, not 2")
    other = tmp_path / "other.csv"
    other.write_text("name,score\nx,1\n")
    one_error(invoke("evaluate", a, b, "--results-file", other, *FAST), 2, f"--results-file {other} has other columns")
    one_error(invoke("evaluate", a, "--results-file", tmp_path / "r.txt", *FAST), 2, "must end in .csv or .json")
    assert model_calls == []

    (tmp_path / "empty.pth").write_bytes(b"")
    results = tmp_path / "results.csv"
    result = invoke("evaluate", tmp_path / "empty.pth", a, "--results-file", results, "--json", *FAST)
    assert result.exit_code == 3, result.output
    bad, good = json.loads(result.stdout)
    assert "is empty (0 bytes)" in bad["error"] and bad["accuracy"] is None
    assert good["error"] is None and good["images"] == 20
    assert [r["checkpoint"] for r in csv.DictReader(results.open())] == [str(tmp_path / "empty.pth"), str(a)]


# --- 1-4. gallery, AUC/AP, calibration plot, bootstrap -------------------------------------------------

def saved(path: Path) -> tuple[list[dict], np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    return rows, np.load(path.with_name(path.stem + ".scores.npy"))


@pytest.fixture
def gallery_spy(monkeypatch) -> list[np.ndarray]:
    """The indices every gallery drawn shows, in order."""
    from torchtool.core.evaluate import outputs

    shown: list[np.ndarray] = []
    real = outputs.plot_gallery

    def spy(preds, losses, indices, path, **kwargs):
        shown.append(np.asarray(indices))
        return real(preds, losses, indices, path, **kwargs)

    monkeypatch.setattr(outputs, "plot_gallery", spy)
    return shown


def test_the_gallery_shows_the_highest_losses(runs, tmp_path, gallery_spy, model_calls):
    _, a, _ = runs
    pred = tmp_path / "p.csv"
    report = report_of(a, "--gallery", tmp_path / "g.png", "--gallery-n", 5, "--save-predictions", pred, *SCORED)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG" and report["files"]["gallery"] == str(tmp_path / "g.png")
    rows, probs = saved(pred)
    names = report["class_names"]
    labels = np.array([names.index(r["label"]) for r in rows])
    losses = -np.log(np.maximum(probs[np.arange(len(rows)), labels].astype(np.float64), np.finfo(np.float32).tiny))
    assert list(gallery_spy[0]) == list(np.argsort(-losses, kind="stable")[:5])  # by hand: the top-5 losses
    assert report["loss"] == pytest.approx(losses.mean(), rel=1e-12)

    # only mistakes involving 1 or 2; the same from the prediction file
    picked = invoke("evaluate", a, "--gallery", tmp_path / "g12.png", "--gallery-classes", "1,2", *FAST)
    again = invoke("evaluate", "--predictions", pred, "--gallery", tmp_path / "f12.png", "--gallery-classes", "1,2")
    assert picked.exit_code == again.exit_code == 0, picked.output + again.output
    preds = np.array([names.index(r["prediction"]) for r in rows])
    wrong = [i for i in range(len(rows)) if labels[i] != preds[i] and ({labels[i], preds[i]} & {1, 2})]
    assert sorted(gallery_spy[1]) == sorted(wrong[:16]) and list(gallery_spy[1]) == list(gallery_spy[2])

    calls = len(model_calls)
    one_error(invoke("evaluate", a, "--gallery", tmp_path / "x.png", "--gallery-classes", "1,seven", *FAST), 2,
              "--gallery-classes: unknown class 'seven'")
    assert len(model_calls) == calls  # refused before any image was read
    # a prediction file without every class's score, or without paths: one line each
    alone = tmp_path / "alone.csv"
    alone.write_text(pred.read_text())
    one_error(invoke("evaluate", "--predictions", alone, "--gallery", tmp_path / "x.png"), 2,
              f"{alone} has no score for every class: no --gallery")
    pathless = tmp_path / "pathless.csv"
    pathless.write_text("".join(",".join(r) + "\n" for r in [["label", "prediction", "score"]] +
                                [[r["label"], r["prediction"], r["score"]] for r in rows]))
    np.save(tmp_path / "pathless.scores.npy", probs)
    one_error(invoke("evaluate", "--predictions", pathless, "--gallery", tmp_path / "x.png"), 2,
              f"{pathless} has no image paths: no --gallery")
    assert not (tmp_path / "x.png").exists()


def test_auc_ap_and_the_calibration_plot(runs, tmp_path):
    from sklearn.metrics import average_precision_score, roc_auc_score

    _, a, _ = runs
    pred, table = tmp_path / "p.csv", tmp_path / "report.csv"
    report = report_of(a, "--save-predictions", pred, *SCORED, "--csv", table, "--calibration-plot",
                       tmp_path / "cal.png")
    rows, probs = saved(pred)
    labels = np.array([report["class_names"].index(r["label"]) for r in rows])
    for c, entry in enumerate(report["per_class"]):
        assert entry["auc"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
        assert entry["ap"] == pytest.approx(average_precision_score(labels == c, probs[:, c]), abs=1e-12)
    assert report["ranking"]["macro"]["auc"] == pytest.approx(np.mean([c["auc"] for c in report["per_class"]]))
    written = list(csv.DictReader(table.open()))
    assert [r["auc"] for r in written[:4]] == [f"{c['auc']:.4f}" for c in report["per_class"]]
    assert (tmp_path / "cal.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(report["calibration"]["count"]) == 20
    # a prediction file without scores has no calibration plot: said in one line, before anything is written
    bare = tmp_path / "bare.csv"
    bare.write_text("label,prediction\n0,0\n1,0\n")
    one_error(invoke("evaluate", "--predictions", bare, "--calibration-plot", tmp_path / "c2.png", "--csv",
                     tmp_path / "r2.csv"), 2, f"{bare} has no scores: no --calibration-plot")
    assert not (tmp_path / "r2.csv").exists()


def test_bootstrap_intervals_are_seeded_and_hold_the_estimate(runs, tmp_path):
    _, a, _ = runs
    pred = tmp_path / "p.csv"
    first = report_of(a, "--bootstrap", 300, "--seed", 3, "--save-predictions", pred, *SCORED)
    again = report_of(a, "--bootstrap", 300, "--seed", 3)
    other = report_of(a, "--bootstrap", 300, "--seed", 4)
    ci = first["ci"]
    assert ci == again["ci"] and ci["resamples"] == 300 and ci["seed"] == 3
    assert ci != other["ci"]
    for key, value in (("accuracy", first["accuracy"]), ("balanced_accuracy", first["balanced_accuracy"]),
                       ("macro_f1", first["averages"]["macro"]["f1"]), ("ece", first["ece"]),
                       ("top4", first["top_k"]["top4"])):
        lo, hi = ci[key]
        assert lo <= value <= hi, key
    # the prediction file gives the very intervals; the table shows them beside the figures
    table = invoke("evaluate", "--predictions", pred, "--bootstrap", 300, "--seed", 3)
    assert table.exit_code == 0, table.output
    assert re.search(rf"^accuracy +{first['accuracy']:.4f} \[{ci['accuracy'][0]:.4f}, {ci['accuracy'][1]:.4f}\]$",
                     table.stdout, flags=re.M), table.stdout
    assert json.loads(invoke("evaluate", "--predictions", pred, "--bootstrap", 300, "--seed", 3, "--json").stdout)[
        "ci"] == ci


# --- 5-6. two models compared, the HTML page --------------------------------------------------------------

def mcnemar_by_hand(a_right: np.ndarray, b_right: np.ndarray) -> dict:
    from math import comb

    a_only, b_only = int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"both_right": int((a_right & b_right).sum()), "a_only": a_only, "b_only": b_only,
            "both_wrong": int((~a_right & ~b_right).sum()), "p_value": p}


def test_compare_two_checkpoints_in_one_pass(runs, tmp_path, model_calls):
    _, a, b = runs
    pa, pb = tmp_path / "a.csv", tmp_path / "b.csv"
    report_of(a, "--save-predictions", pa)
    report_of(b, "--save-predictions", pb)
    del model_calls[:]
    report = report_of(a, "--compare", b)
    assert sum(model_calls) == 20  # both models on each batch: one pass over the images
    comparison = report["comparison"]
    rows_a, rows_b = list(csv.DictReader(pa.open())), list(csv.DictReader(pb.open()))
    right_a = np.array([r["label"] == r["prediction"] for r in rows_a])
    right_b = np.array([r["label"] == r["prediction"] for r in rows_b])
    assert comparison["mcnemar"] == pytest.approx(mcnemar_by_hand(right_a, right_b))
    assert comparison["images"] == 20 and comparison["names"] == [str(a), str(b)]
    assert comparison["accuracy"]["delta"] == pytest.approx(right_b.mean() - right_a.mean())
    # the same from B's prediction file, and from two prediction files
    for args in ([a, "--compare", pb], ["--predictions", pa, "--compare", pb]):
        other = report_of(*args)["comparison"]
        assert {k: v for k, v in other.items() if k != "names"} == {k: v for k, v in comparison.items() if k != "names"}
    # the table: the 2x2 counts, McNemar's p, the per-class deltas
    table = invoke("evaluate", a, "--compare", pb, *FAST)
    assert table.exit_code == 0 and re.search(r"^mcnemar_p +[\d.e-]+$", table.stdout, flags=re.M), table.output
    assert re.search(r"^class +support +recall_a +recall_b +delta_recall", table.stdout, flags=re.M)


def test_compare_says_what_it_leaves_out_and_refuses_other_classes(runs, tmp_path, model_calls):
    _, a, b = runs
    pb = tmp_path / "b.csv"
    report_of(b, "--save-predictions", pb)
    lines = pb.read_text().splitlines(keepends=True)
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("".join(lines[:2] + lines[5:]))  # 3 images fewer (the first row holds the class list)
    result = invoke("evaluate", a, "--compare", fewer, "--json", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)["comparison"]
    assert comparison["images"] == 17 and len(comparison["only_a"]) == 3 and comparison["only_b"] == []
    said = [ln for ln in result.stderr.splitlines() if "left out of the comparison" in ln]
    assert said == [f"torchtool: 3 images only in {a} and 0 only in {fewer} are left out of the comparison (17 in both)"]

    # another preprocessing: two passes, said
    del model_calls[:]
    wider = with_preprocess(b, tmp_path / "wider.pth", crop_size=40, resize_size=48)
    result = invoke("evaluate", a, "--compare", wider, "--json", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0 and sum(model_calls) == 40, result.output
    assert "two passes over the images" in result.stderr
    # other classes: refused before any image is read
    state = load_checkpoint(b)
    state["classes"] = ["0", "1", "2", "x"]
    torch.save(state, tmp_path / "x.pth")
    del model_calls[:]
    one_error(invoke("evaluate", a, "--compare", tmp_path / "x.pth", *FAST), 2, "classes of")
    one_error(invoke("evaluate", a, "--compare", tmp_path / "missing.pth", *FAST), 2, "no such file")
    assert model_calls == []


def test_compare_under_torchrun_is_one_pass_per_process(run_python, runs, tmp_path):
    _, a, b = runs
    common = ["-m", "torchtool", "evaluate", str(a), "--compare", str(b), "--json", "--workers", "0", "--device",
              "cpu", "--quiet"]
    env = {"OMP_NUM_THREADS": "1"}
    two = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *common,
                     env={**env, "TMPDIR": str(tmp_path)}, timeout=GENEROUS_S)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_python(*common, env=env, timeout=GENEROUS_S)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(two.stdout)["comparison"] == json.loads(one.stdout)["comparison"]


class Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.tags = set(), [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.ids.add(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))


def test_the_html_page_holds_every_section_offline(runs, tmp_path):
    _, a, b = runs
    page = tmp_path / "report.html"
    report = report_of(a, "--html", page, "--compare", b, "--bootstrap", 100, "--save-predictions",
                       tmp_path / "p.csv", *SCORED)
    parsed = Sections()
    parsed.feed(page.read_text())
    assert {"summary", "per-class", "confusion", "calibration", "gallery", "comparison"} <= parsed.ids
    assert len(parsed.images) == 3 and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert "script" not in parsed.tags and "http" not in page.read_text().replace("http-equiv", "")
    assert report["files"]["html"] == str(page)
    # a prediction file without every class's score: the page, without the gallery
    lean = tmp_path / "lean.csv"
    lean.write_text((tmp_path / "p.csv").read_text())
    result = invoke("evaluate", "--predictions", lean, "--html", tmp_path / "lean.html")
    assert result.exit_code == 0, result.output
    parsed = Sections()
    parsed.feed((tmp_path / "lean.html").read_text())
    assert {"summary", "per-class", "confusion", "calibration"} <= parsed.ids and "gallery" not in parsed.ids


def test_results_file_appends_wait_for_each_other(tmp_path):
    """Two runs appending at once both keep their rows: an append waits for the other's lock on the folder."""
    import fcntl
    import os
    import threading

    from torchtool.core.evaluate.results import append_results, result_row

    path = tmp_path / "results.csv"
    append_results(path, [result_row("first", error="x")])
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another run, between reading the file and replacing it
    second = threading.Thread(target=append_results, args=(path, [result_row("second", error="y")]))
    second.start()
    # a held lock keeps it waiting however slow the machine (a broken lock could only pass here, never fail)
    second.join(timeout=1.0)
    assert second.is_alive(), "the append did not wait for the other run"
    text = path.read_text()
    path.write_text(text + "other,,,,,,,,z\n")  # the other run's row lands, then it lets go
    os.close(held)
    second.join(timeout=GENEROUS_S)
    assert [r["checkpoint"] for r in csv.DictReader(path.open())] == ["first", "other", "second"]
