"""The report's numbers against scikit-learn, the spreadsheet's layout by hand, ECE by hand, prediction files."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

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
        "class,label,support,precision,recall,f1,confused_1,confused_2,confused_3,confused_4,confused_5",
        # cat: 2 right; 1 taken for dog, 1 for fox (a tie: label order)
        "cat,0,4,0.4000,0.5000,0.4444,dog:1,fox:1,,,",
        "dog,1,3,0.5000,0.6667,0.5714,cat:1,,,,",
        # fox: 2 right; one each for cat, dog, ghost (never its own column, never itself)
        "fox,2,5,0.4000,0.4000,0.4000,cat:1,dog:1,ghost:1,,",
        "ghost,3,0,0.0000,0.0000,0.0000,,,,,",
        "never,4,3,0.0000,0.0000,0.0000,fox:2,cat:1,,,",  # counts first, then label order
        "All,,15,0.4000,0.4000,0.4000,,,,,",
        "Macro,,15,0.2600,0.3133,0.2832,,,,,",
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
