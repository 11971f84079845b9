"""The report's numbers against scikit-learn, the spreadsheet's layout by hand, ECE by hand, prediction files."""

from __future__ import annotations

import csv
import io
import sys
import warnings

import numpy as np
import pytest
from sklearn import metrics

from torchtool.core.evaluate.plots import plot_confusion, shown_name
from torchtool.core.evaluate.predictions import read_predictions, write_predictions
from torchtool.core.evaluate.report import Predictions, build_report, expected_calibration_error, report_csv
from torchtool.core.output import UsageError

# 5 classes: "ghost" (label 3) has no image; "never" (label 4) has images but is never predicted.
CLASSES = ["cat", "dog", "fox", "ghost", "never"]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 4, 4, 4])
PREDS = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 0, 1, 3, 0, 2, 2])


def test_numbers_equal_sklearns_classification_report():
    report = build_report(Predictions(CLASSES, LABELS, PREDS))
    reference = metrics.classification_report(LABELS, PREDS, labels=range(5), target_names=CLASSES,
                                              output_dict=True, zero_division=0)
    for row in report["per_class"]:
        ref = reference[row["class"]]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"], ref["support"]))
    for ours, theirs in (("macro", "macro avg"), ("weighted", "weighted avg")):
        avg = report["averages"][ours]
        assert (avg["precision"], avg["recall"], avg["f1"]) == pytest.approx(
            (reference[theirs]["precision"], reference[theirs]["recall"], reference[theirs]["f1-score"]))
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(LABELS, PREDS)) == 6 / 15
    assert report["averages"]["micro"]["f1"] == pytest.approx(report["accuracy"])
    with pytest.warns(UserWarning):  # sklearn warns about the never-true class; the report does not
        assert report["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(LABELS, PREDS))
    assert np.array(report["confusion_matrix"]).shape == (5, 5)  # the class with no image keeps its row
    assert report["per_class"][3]["support"] == 0 and report["per_class"][4]["precision"] == 0


def test_spreadsheet_layout_and_confused_classes_by_hand():
    text = report_csv(build_report(Predictions(CLASSES, LABELS, PREDS)))
    assert text.splitlines() == [
        "class,label,support,precision,recall,f1,auc,ap,confused_1,confused_2,confused_3,confused_4,confused_5",
        # cat: 2 right; 1 taken for dog, 1 for fox (a tie: label order); no scores: no auc/ap
        "cat,0,4,0.4000,0.5000,0.4444,,,dog:1,fox:1,,,",
        "dog,1,3,0.5000,0.6667,0.5714,,,cat:1,,,,",
        # fox: 2 right; one each for cat, dog, ghost (never its own column, never itself)
        "fox,2,5,0.4000,0.4000,0.4000,,,cat:1,dog:1,ghost:1,,",
        "ghost,3,0,0.0000,0.0000,0.0000,,,,,,,",
        "never,4,3,0.0000,0.0000,0.0000,,,fox:2,cat:1,,,",  # counts first, then label order
        "All,,15,0.4000,0.4000,0.4000,,,,,,,",
        "Macro,,15,0.2600,0.3133,0.2832,,,,,,,",
        # by support: precision (4x0.4 + 3x0.5 + 5x0.4) / 15, F1 (4x4/9 + 3x4/7 + 5x0.4) / 15
        "Weighted,,15,0.3400,0.4000,0.3661,,,,,,,",
    ]


def test_ece_against_a_hand_computation():
    conf = np.array([0.03, 0.05, 0.5, 0.55, 0.9, 0.95, 1.0])
    correct = np.array([0, 1, 1, 0, 1, 1, 1])
    # 15 bins (lo, hi]: 0.03 and 0.05 share (0, 1/15]; 0.5 in (7/15, 8/15]; 0.55 in (8/15, 9/15];
    # 0.9 in (13/15, 14/15]; 0.95 and 1.0 (the top edge) in (14/15, 1].
    by_hand = (2 * abs(0.5 - 0.04) + abs(1 - 0.5) + abs(0 - 0.55) + abs(1 - 0.9) + 2 * abs(1 - 0.975)) / 7
    assert expected_calibration_error(conf, correct) == pytest.approx(by_hand)
    assert expected_calibration_error(np.ones(4), np.ones(4)) == 0


def test_prediction_files_round_trip_and_refuse_bad_ones(tmp_path):
    preds = Predictions(CLASSES, LABELS, PREDS, np.linspace(0.2, 0.9, len(LABELS)).round(6),
                        [f"img{i}.jpg" for i in range(len(LABELS))])
    path = tmp_path / "p.csv"
    write_predictions(path, preds)
    back = read_predictions(str(path), CLASSES)
    assert (back.labels == LABELS).all() and (back.predictions == PREDS).all() and back.paths == preds.paths
    assert back.scores == pytest.approx(preds.scores)
    assert build_report(back) == build_report(preds)

    indices = tmp_path / "i.csv"
    indices.write_text("prediction,label\n2,0\n0,0\n")  # indices, columns in any order, no score
    got = read_predictions(str(indices))
    assert got.classes == ["0", "1", "2"] and got.labels.tolist() == [0, 0] and got.scores is None

    for text, message in (("label,guess\na,b\n", "no 'prediction' column"),
                          ("label,prediction\na,\n", "empty prediction on line 2"),
                          ("label,prediction,score\na,a,high\n", "score 'high' on line 2 is not a number"),
                          ("label,prediction\n", "holds no predictions"),
                          ("label,prediction\ncat,wolf\n", "unknown prediction 'wolf' on line 2")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UsageError, match=message):
            read_predictions(str(bad), CLASSES if "wolf" in text else None)


def test_ece_bins_are_fifteen_and_the_top_one_holds_a_confidence_of_one():
    # confidences exactly on 15-bin edges (k/15 belongs to the bin below it), 0 and 1.0
    conf = np.array([0.0, 1 / 15, 2 / 15, 0.1, 3 / 15, 7 / 15, 0.5, 14 / 15, 0.95, 1.0, 1.0])
    correct = np.array([0, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0])
    bins = [  # (lo, hi] of 15 bins, by hand: [members], then |sum(correct) - sum(conf)|
        ([0.0, 1 / 15], [0, 1]),  # 0 joins the first bin
        ([2 / 15, 0.1], [0, 1]),  # 0.1 is in (1/15, 2/15]: ten bins would put it with 0 and 1/15
        ([3 / 15], [1]),
        ([7 / 15], [0]),
        ([0.5], [1]),  # (7/15, 8/15]
        ([14 / 15], [1]),
        ([0.95, 1.0, 1.0], [1, 0, 0]),  # (14/15, 1]: 1.0 in the top bin, not left out nor a bin of its own
    ]
    by_hand = sum(abs(sum(hit) - sum(c)) for c, hit in bins) / len(conf)
    assert expected_calibration_error(conf, correct) == pytest.approx(by_hand, abs=1e-12)
    assert by_hand != pytest.approx(expected_calibration_error(conf, correct, bins=10))


def test_a_nan_score_gives_no_ece_rather_than_a_wrong_one():
    scores = np.linspace(0.2, 0.9, len(LABELS))
    scores[3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing raw from numpy
        report = build_report(Predictions(CLASSES, LABELS, PREDS, scores))
    assert report["ece"] is None and report["accuracy"] == 6 / 15


def _round_trip(tmp_path, preds: Predictions) -> Predictions:
    path = tmp_path / "saved.csv"
    write_predictions(path, preds)
    return read_predictions(str(path))


@pytest.mark.parametrize("classes", [
    [f"class{i}" for i in range(10)],  # only class 3 present (below)
    ["1", "10", "2"],  # numeric names: not indices 0..10
    ["01", "02", "1"],  # zero-padded: not "unknown"
    [" cat", "cat", "dog "],  # spaces kept, order kept
    ["latin\udce9", "b$c$", 'comma, "quote"', "new\nline"],  # a non-UTF-8 byte, mathtext, CSV quoting
], ids=["subset", "numeric", "zero-padded", "spaces", "odd-bytes"])
def test_saved_predictions_read_back_to_the_identical_report(tmp_path, classes):
    n = len(classes)
    if n == 10:
        labels, preds = np.array([3, 3, 3]), np.array([3, 3, 3])
    else:
        labels, preds = np.arange(12) % n, (np.arange(12) * 7 + 1) % n
    scores = np.linspace(0.3, 1.0, len(labels)).round(6)
    scores[1] = np.nan  # an unknown score travels as "nan"
    original = Predictions(classes, labels, preds, scores, [f"/d/img{i}.png" for i in range(len(labels))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "single label" note from scikit-learn, no numpy cast warning
        back = _round_trip(tmp_path, original)
        assert back.classes == classes
        assert build_report(back) == build_report(original)
    assert report_csv(build_report(back)) == report_csv(build_report(original))
    # the file stays a plain table (what pandas and Excel read): a header, then rows of as many cells
    with open(tmp_path / "saved.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["path", "label", "prediction", "score", "classes"] and len(table) == len(labels) + 1
    assert {len(row) for row in table} == {5} and all(row[4] == "" for row in table[2:])


def test_files_without_the_class_list_read_as_before(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("path,label,prediction,score\na.png,1,10,0.5\nb.png,2,2,0.9\n")  # digits are indices
    got = read_predictions(str(old))
    assert got.classes == [str(i) for i in range(11)] and got.predictions.tolist() == [10, 2]
    old.write_text("label,prediction\n cat , dog\ndog,cat\n")  # names stripped and sorted
    assert read_predictions(str(old)).classes == ["cat", "dog"]


def test_a_utf8_bom_is_read(tmp_path, monkeypatch):
    text = "label,prediction,score\ncat,dog,0.6\ndog,dog,0.8\n"
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8"
    got = read_predictions(str(bom))
    assert got.classes == ["cat", "dog"] and got.labels.tolist() == [0, 1]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbf" + text.encode())))
    assert read_predictions("-").predictions.tolist() == [1, 1]


def test_one_class_in_all_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = build_report(Predictions(["only"], np.array([0, 0]), np.array([0, 0]), np.array([0.7, 1.0])))
    assert report["confusion_matrix"] == [[2]] and report["accuracy"] == 1.0


def test_the_picture_draws_any_class_name_as_plain_text(tmp_path, monkeypatch):
    import matplotlib

    names = ["latin\udce9", "$\\frac$", "a$b$c", "tab\there", "\u4e2d\u6587"]
    report = build_report(Predictions(names, np.arange(5), np.array([1, 1, 2, 3, 4])))
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)  # a user's matplotlibrc: no LaTeX is run
    notes = plot_confusion(report, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    assert notes == [f"some class names in {tmp_path / 'cm.png'} have characters the font cannot draw: "
                     "they show as boxes"]  # the CJK name, said once in our words
    assert [shown_name(n) for n in names[:4]] == ["latin\\xe9", "$\\frac$", "a$b$c", "tab\\there"]
