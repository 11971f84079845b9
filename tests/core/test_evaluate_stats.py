"""The report's new figures against references: scikit-learn's AUC/AP, torch's cross-entropy, a hand-written
bootstrap, McNemar's test by hand; two models compared by path; the full scores' round trip through files."""

from __future__ import annotations

import io
import math
import os
import sys
import warnings

import numpy as np
import pytest
from sklearn import metrics

from torchtool.core.evaluate.predictions import read_predictions, scores_path, write_predictions
from torchtool.core.evaluate.report import (
    Predictions, build_report, expected_calibration_error, report_csv, sample_losses, summary_lines,
)
from torchtool.core.evaluate.stats import bootstrap_intervals, compare, compare_rows, mcnemar
from torchtool.core.output import UsageError

CLASSES = ["cat", "dog", "fox", "ghost", "owl"]  # "ghost" (3) never true


def _model_run(n: int, seed: int = 0, classes: list[str] = CLASSES, skill: float = 1.5,
               missing: int | None = 3) -> tuple[Predictions, np.ndarray]:
    """What a model run hands build_report: float32 softmax of float32 logits, the top score rounded as
    --save-predictions writes it. Returns the predictions and the logits."""
    import torch

    rng = np.random.default_rng(seed)
    c = len(classes)
    pool = [k for k in range(c) if k != missing]
    labels = rng.choice(pool, size=n)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    logits[np.arange(n), labels] += skill
    probs = torch.from_numpy(logits).softmax(dim=1).numpy()
    top = probs.max(axis=1)
    preds = Predictions(list(classes), labels.astype(np.int64), probs.argmax(axis=1).astype(np.int64),
                        np.round(top.astype(np.float64), 6), [f"/val/{labels[i]}/img{i}.png" for i in range(n)], probs)
    return preds, logits


@pytest.mark.parametrize("levels", [None, 8], ids=["distinct", "tied"])
def test_auc_and_ap_equal_scikit_learns_and_a_class_without_positives_is_left_out_once(levels):
    preds, _ = _model_run(120)
    if levels:  # scores on a coarse grid: many ties within a class's column, across positives and negatives
        preds.probs = (np.round(preds.probs * levels) / levels).astype(np.float32)
    report = build_report(preds)
    kept = [0, 1, 2, 4]
    for c, row in enumerate(report["per_class"]):
        if c == 3:
            assert row["auc"] is None and row["ap"] is None
            continue
        positive = preds.labels == c
        assert row["auc"] == pytest.approx(metrics.roc_auc_score(positive, preds.probs[:, c]), abs=1e-12)
        assert row["ap"] == pytest.approx(metrics.average_precision_score(positive, preds.probs[:, c]), abs=1e-12)
    support = np.array([report["per_class"][c]["support"] for c in kept])
    for key in ("auc", "ap"):
        values = np.array([report["per_class"][c][key] for c in kept])
        assert report["ranking"]["macro"][key] == pytest.approx(values.mean(), abs=1e-12)
        assert report["ranking"]["weighted"][key] == pytest.approx((values * support).sum() / support.sum(), abs=1e-12)
    assert report["ranking"]["left_out"] == ["ghost"]
    assert report["notes"] == ["1 class has no positive image: left out of the AUC/AP averages"]
    lines = report_csv(report).splitlines()
    assert lines[4].startswith("ghost,3,0,0.0000,0.0000,0.0000,,,")  # empty cells
    assert lines[6].split(",")[6:8] == ["", ""]  # All (micro) has none
    assert lines[7].split(",")[6:8] == [f"{report['ranking']['macro']['auc']:.4f}",
                                        f"{report['ranking']['macro']['ap']:.4f}"]
    assert lines[8].split(",")[:1] + lines[8].split(",")[6:7] == ["Weighted",
                                                                   f"{report['ranking']['weighted']['auc']:.4f}"]


def test_one_class_holding_every_image_has_no_negative_and_no_averages():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 from numpy on the way
        report = build_report(Predictions(["a", "b"], np.zeros(3, np.int64), np.array([0, 0, 1]), None, None, probs))
    assert [r["auc"] for r in report["per_class"]] == [None, None]
    assert report["ranking"] == {"left_out": ["a", "b"], "macro": {"auc": None, "ap": None},
                                 "weighted": {"auc": None, "ap": None}}
    assert report["notes"] == ["1 class has no positive image: left out of the AUC/AP averages",
                               "1 class has no negative image: left out of the AUC/AP averages"]


def test_without_scores_the_new_figures_are_absent_not_invented():
    report = build_report(Predictions(CLASSES, np.array([0, 1, 2]), np.array([0, 2, 2])))
    assert report["loss"] is None and report["ranking"] is None and report["calibration"] is None
    assert report["top_k"] is None and report["notes"] == []
    assert all(r["auc"] is None and r["ap"] is None for r in report["per_class"])


def test_loss_equals_torchs_cross_entropy_on_the_logits():
    import torch

    preds, logits = _model_run(200, seed=1, skill=3.0)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(preds.labels), reduction="none")
    np.testing.assert_allclose(sample_losses(preds), ce.double().numpy(), atol=1e-5)
    assert build_report(preds)["loss"] == pytest.approx(float(ce.double().mean()), abs=1e-5)
    # a true class scored exactly 0 costs -log(float32 tiny), not infinity
    zero = Predictions(["a", "b"], np.array([0]), np.array([1]), None, None, np.array([[0.0, 1.0]], np.float32))
    assert sample_losses(zero)[0] == pytest.approx(-math.log(np.finfo(np.float32).tiny))


def test_top_k_from_the_scores_equals_scikit_learns_and_ties_follow_argmax():
    preds, _ = _model_run(150, seed=2, skill=0.8)
    report = build_report(preds, ks=(1, 3, 9))  # 9 is capped at the 5 classes
    assert set(report["top_k"]) == {"top1", "top3", "top5"}
    for k in (1, 3):
        assert report["top_k"][f"top{k}"] == metrics.top_k_accuracy_score(preds.labels, preds.probs, k=k,
                                                                          labels=range(5))
    assert report["top_k"]["top1"] == report["accuracy"] and report["top_k"]["top5"] == 1.0
    assert build_report(preds, {"top1": 0.25})["top_k"] == {"top1": 0.25}  # given explicitly: kept
    # a tie goes to the lower index (argmax's order): class 1's image tied with class 0 ranks second
    tied = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]], dtype=np.float32)
    same = build_report(Predictions(["a", "b", "c"], np.array([0, 1]), tied.argmax(1), None, None, tied), ks=(1, 2))
    assert same["top_k"] == {"top1": 0.5, "top2": 1.0} and same["accuracy"] == 0.5


def test_calibration_bins_are_the_eces_own():
    conf = np.array([0.03, 0.05, 0.5, 0.55, 0.9, 0.95, 1.0])
    labels = np.array([0, 1, 1, 0, 1, 1, 1])  # "right" where the label is 1: every prediction is 1
    report = build_report(Predictions(["no", "yes"], labels, np.ones(7, np.int64), conf))
    cal = report["calibration"]
    assert cal["bins"] == 15 and cal["edges"] == pytest.approx(np.linspace(0, 1, 16)) and len(cal["edges"]) == 16
    # by hand (bins (lo, hi]): 0.03, 0.05 in bin 0; 0.5 in 7; 0.55 in 8; 0.9 in 13; 0.95, 1.0 in 14
    assert cal["count"] == [2, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 2]
    assert cal["confidence"][0] == pytest.approx(0.04) and cal["accuracy"][0] == 0.5
    assert cal["confidence"][1] is None and cal["accuracy"][1] is None
    assert cal["confidence"][14] == pytest.approx(0.975) and cal["accuracy"][14] == 1.0
    gaps = sum(n * abs(a - c) for n, a, c in zip(cal["count"], cal["accuracy"], cal["confidence"]) if n) / 7
    assert gaps == pytest.approx(report["ece"], abs=1e-12)


def _figures_by_hand(preds: Predictions, idx: np.ndarray, ks: list[int]) -> dict[str, float]:
    """One resample's figures the slow way: scikit-learn on the resampled rows."""
    y, p = preds.labels[idx], preds.predictions[idx]
    out = {"accuracy": metrics.accuracy_score(y, p)}
    for k in ks:
        out[f"top{k}"] = metrics.top_k_accuracy_score(y, preds.probs[idx], k=k, labels=range(len(preds.classes)))
    out["balanced_accuracy"] = metrics.balanced_accuracy_score(y, p)
    out["macro_f1"] = metrics.f1_score(y, p, labels=range(len(preds.classes)), average="macro", zero_division=0)
    out["ece"] = expected_calibration_error(preds.scores[idx], y == p)
    return out


def test_the_bootstrap_equals_a_hand_written_loop_over_the_same_resamples():
    preds, _ = _model_run(40, seed=3, skill=0.7)
    n, seed = 60, 11
    ci = bootstrap_intervals(preds, n, seed, ks=(1, 3))
    draws = np.random.default_rng(seed).integers(0, 40, size=(n, 40))  # the documented resample indices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": the report ignores it too
        by_hand = [_figures_by_hand(preds, idx, [3]) for idx in draws]
    assert set(ci) == {"accuracy", "top3", "balanced_accuracy", "macro_f1", "ece", "resamples", "seed"}
    for key in ("accuracy", "top3", "balanced_accuracy", "macro_f1", "ece"):
        values = [f[key] for f in by_hand]
        assert ci[key] == pytest.approx(list(np.percentile(values, [2.5, 97.5])), abs=1e-12), key
    assert (ci["resamples"], ci["seed"]) == (60, 11)


def test_bootstrap_intervals_hold_the_estimate_shrink_with_more_images_and_are_seeded():
    small, _ = _model_run(200, seed=4)
    large, _ = _model_run(5000, seed=4)
    widths = {}
    for name, preds in (("small", small), ("large", large)):
        report = build_report(preds, bootstrap=300, seed=7)
        ci = report["ci"]
        point = {"accuracy": report["accuracy"], "top5": report["top_k"]["top5"],
                 "balanced_accuracy": report["balanced_accuracy"],
                 "macro_f1": report["averages"]["macro"]["f1"], "ece": report["ece"]}
        for key, value in point.items():
            assert ci[key][0] <= value <= ci[key][1], (name, key)
        widths[name] = {k: ci[k][1] - ci[k][0] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece")}
    for key, wide in widths["small"].items():
        assert widths["large"][key] < wide / 2, key  # ~1/sqrt(25) as wide
    assert bootstrap_intervals(small, 300, 7) == build_report(small, bootstrap=300, seed=7)["ci"]
    assert bootstrap_intervals(small, 300, 8)["accuracy"] != bootstrap_intervals(small, 300, 7)["accuracy"]


def test_bootstrap_in_chunks_draws_the_same_resamples(monkeypatch):
    from torchtool.core.evaluate import stats

    preds, _ = _model_run(50, seed=5)
    whole = bootstrap_intervals(preds, 40, 3)
    monkeypatch.setattr(stats, "CHUNK", 150)  # 3 resamples a step
    assert bootstrap_intervals(preds, 40, 3) == whole


def test_summary_shows_intervals_beside_their_figures():
    preds, _ = _model_run(100, seed=6)
    report = build_report(preds, bootstrap=100, seed=0)
    lines = summary_lines(report)
    lo, hi = report["ci"]["accuracy"]
    assert lines["accuracy"] == f"{report['accuracy']:.4f} [{lo:.4f}, {hi:.4f}]"
    assert lines["top5_accuracy"].startswith("1.0000 [1.0000, 1.0000]")
    assert lines["loss"] == round(report["loss"], 4)  # no interval for the loss: a plain number
    assert lines["macro_f1"].count("[") == 1 and lines["ece"].count("[") == 1
    plain = summary_lines(build_report(preds))
    assert plain["accuracy"] == round(report["accuracy"], 4) and plain["macro_f1"] == round(
        report["averages"]["macro"]["f1"], 4)


def _p_by_hand(a_only: int, b_only: int) -> float:
    n, k = a_only + b_only, min(a_only, b_only)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


@pytest.mark.parametrize("a_only,b_only", [(9, 2), (3, 3), (0, 6), (1, 0), (25, 12)])
def test_mcnemar_equals_a_binomial_sum_by_hand(a_only, b_only):
    both_right, both_wrong = 30, 7
    a = np.array([1] * both_right + [1] * a_only + [0] * b_only + [0] * both_wrong, dtype=bool)
    b = np.array([1] * both_right + [0] * a_only + [1] * b_only + [0] * both_wrong, dtype=bool)
    order = np.random.default_rng(0).permutation(len(a))
    got = mcnemar(a[order], b[order])
    assert (got["both_right"], got["a_only"], got["b_only"], got["both_wrong"]) == (both_right, a_only, b_only,
                                                                                   both_wrong)
    assert got["p_value"] == pytest.approx(_p_by_hand(a_only, b_only), rel=1e-9)


def test_mcnemar_of_identical_predictions_is_one():
    right = np.array([True, False, True, True])
    assert mcnemar(right, right) == {"both_right": 3, "a_only": 0, "b_only": 0, "both_wrong": 1, "p_value": 1.0}


def test_compare_matches_images_by_path_and_lists_the_others():
    a, _ = _model_run(60, seed=7, skill=1.0)
    b, _ = _model_run(60, seed=7, skill=2.5)  # the same images and labels, a better model
    keep = np.random.default_rng(1).permutation(60)[:55]  # B: shuffled, 5 images missing, 2 of its own
    extra = ["/val/0/new1.png", "/val/0/new2.png"]
    b = Predictions(b.classes, np.r_[b.labels[keep], 0, 0], np.r_[b.predictions[keep], 1, 1], None,
                    [b.paths[i] for i in keep] + extra)
    got = compare(a, b, names=("base", "new"))
    common = np.sort(keep)
    assert got["images"] == 55 and got["names"] == ["base", "new"]
    assert got["only_a"] == [a.paths[i] for i in range(60) if i not in set(keep)] and got["only_b"] == extra
    assert got["notes"] == ["5 images only in base and 2 only in new are left out of the comparison (55 in both)"]
    y, pa = a.labels[common], a.predictions[common]
    pb = np.empty(60, np.int64)
    pb[keep] = b.predictions[:55]
    pb = pb[common]
    assert got["accuracy"] == pytest.approx({"a": metrics.accuracy_score(y, pa), "b": metrics.accuracy_score(y, pb),
                                             "delta": metrics.accuracy_score(y, pb) - metrics.accuracy_score(y, pa)})
    f1b = metrics.f1_score(y, pb, labels=range(5), average=None, zero_division=0)
    recall_a = metrics.recall_score(y, pa, labels=range(5), average=None, zero_division=0)
    for c, row in enumerate(got["per_class"]):
        assert row["support"] == int((y == c).sum()) and row["f1_b"] == pytest.approx(f1b[c])
        assert row["recall_a"] == pytest.approx(recall_a[c])
        assert row["delta_f1"] == pytest.approx(row["f1_b"] - row["f1_a"])
    assert got["mcnemar"] == mcnemar(pa == y, pb == y) and got["mcnemar"]["b_only"] > got["mcnemar"]["a_only"]
    rows = compare_rows(got)
    assert [r["class"] for r in rows] == [*CLASSES, "All", "Macro"]
    assert rows[-2]["recall_a"] == f"{got['accuracy']['a']:.4f}" and rows[-2]["delta_recall"].startswith("+")
    assert rows[-1]["f1_b"] == f"{got['macro_f1']['b']:.4f}"
    assert compare_rows(got, text=False)[0]["recall_b"] == round(got["per_class"][0]["recall_b"], 4)


def test_compare_refuses_what_it_cannot_match():
    a, _ = _model_run(10, seed=8)
    with pytest.raises(UsageError, match="B has no image paths"):
        compare(a, Predictions(a.classes, a.labels, a.predictions))
    with pytest.raises(UsageError, match="different classes"):
        compare(a, Predictions(a.classes[::-1], a.labels, a.predictions, None, a.paths))
    with pytest.raises(UsageError, match="no image in common"):
        compare(a, Predictions(a.classes, a.labels, a.predictions, None, [p + "x" for p in a.paths]))
    relabelled = a.labels.copy()
    relabelled[4] = (relabelled[4] + 1) % 5
    with pytest.raises(UsageError, match="not the same test set"):
        compare(a, Predictions(a.classes, relabelled, a.predictions, None, a.paths))


def test_saved_full_scores_reproduce_every_new_figure(tmp_path):
    preds, _ = _model_run(80, seed=9)
    path = tmp_path / "preds.csv"
    assert write_predictions(path, preds, all_scores=True) == scores_path(path) == tmp_path / "preds.scores.npy"
    back = read_predictions(str(path))
    assert back.probs.dtype == np.float32 and np.array_equal(back.probs, preds.probs)
    ours = build_report(preds, bootstrap=50, seed=2)
    theirs = build_report(back, bootstrap=50, seed=2)
    assert theirs == ours
    for key in ("loss", "ranking", "calibration", "ci", "top_k", "notes"):
        assert ours[key]  # each new figure is there, not None on both sides
    assert report_csv(theirs) == report_csv(ours)
    # without the companion, the CSV alone gives no ranking (and says nothing wrong)
    write_predictions(tmp_path / "plain.csv", preds)
    assert not scores_path(tmp_path / "plain.csv").exists()
    assert build_report(read_predictions(str(tmp_path / "plain.csv")))["ranking"] is None


def test_a_companion_that_does_not_belong_is_refused_in_one_line(tmp_path):
    preds, _ = _model_run(30, seed=10)
    path = tmp_path / "preds.csv"
    write_predictions(path, preds, all_scores=True)
    companion = scores_path(path)
    for probs, message in ((preds.probs[:-1], r"holds float32 scores of shape \[29, 5\], but .* has 30 predictions"),
                           (preds.probs[:, :4], "of 5 classes"),
                           (preds.probs[::-1], "does not belong to"),
                           (np.where(np.arange(5) == 2, np.nan, preds.probs).astype(np.float32), "row 1 holds"),
                           (preds.probs.astype(np.int64), "int64 scores")):
        np.save(companion, probs)
        with pytest.raises(UsageError, match=message) as caught:
            read_predictions(str(path))
        assert "\n" not in caught.value.message and "move it away" in caught.value.hint
    companion.write_bytes(b"not numpy")
    with pytest.raises(UsageError, match="is not a .npy array"):
        read_predictions(str(path))


def test_stdin_has_no_companion_and_streams_refuse_one(tmp_path, monkeypatch):
    preds, _ = _model_run(5, seed=11)
    path = tmp_path / "preds.csv"
    write_predictions(path, preds, all_scores=True)
    monkeypatch.chdir(tmp_path)  # "-.scores.npy" would be the companion's name, were stdin a file
    np.save(tmp_path / "-.scores.npy", preds.probs)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes())))
    assert read_predictions("-").probs is None
    os.mkfifo(tmp_path / "pipe")  # a stream (like /dev/stdout on a terminal) has no "beside it"
    with pytest.raises(UsageError, match="need a file beside it"):
        write_predictions(tmp_path / "pipe", preds, all_scores=True)
    assert [scores_path(p).name for p in ("a.csv", "a.CSV", "a", "a.b.csv", "a.txt")] == [
        "a.scores.npy", "a.scores.npy", "a.scores.npy", "a.b.scores.npy", "a.txt.scores.npy"]
