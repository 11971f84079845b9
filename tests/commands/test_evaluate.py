"""torchtool evaluate end to end: checkpoints of real digit runs, prediction files, bad inputs, torchrun."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import GENEROUS_S
import torch
from typer.testing import CliRunner

from tests.commands.test_extract_features import Payload
from tests.finetune_data import add_broken_images, write_digits
from torchtool.cli import app
from torchtool.core.models.checkpoint import load_checkpoint

runner = CliRunner()
TRAIN = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "16",
         "--workers", "0", "--augment", "none", "--device", "cpu", "--epochs", "2", "--quiet"]
FAST = ["--workers", "0", "--device", "cpu", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def split_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, checkpoint): 4 digits in DATA/train and DATA/val (5 val images each: 20, odd per process of 3)."""
    root = tmp_path_factory.mktemp("eval_split")
    data = write_digits(root / "data", labels=range(4), train_per_class=20, val_per_class=5)
    result = invoke("finetune", data, "--out", root / "run", *TRAIN)
    assert result.exit_code == 0, result.output
    return data, root / "run" / "best.pth"


@pytest.fixture(scope="module")
def val_split_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, checkpoint): 3 digits in DATA/<class>/, 21 images each, trained with --val-split 0.2."""
    root = tmp_path_factory.mktemp("eval_flat")
    data = write_digits(root / "data", labels=range(3), train_per_class=21, val_per_class=0, layout="flat")
    result = invoke("finetune", data, "--out", root / "run", "--val-split", "0.2", *TRAIN)
    assert result.exit_code == 0, result.output
    return data, root / "run" / "best.pth"


def test_a_val_split_checkpoint_alone_gives_the_report_and_its_files(val_split_run, tmp_path):
    data, ckpt = val_split_run
    files = {"--csv": tmp_path / "report.csv", "--confusion-csv": tmp_path / "cm.csv", "--plot": tmp_path / "cm.png",
             "--save-predictions": tmp_path / "pred.csv"}
    result = invoke("evaluate", ckpt, *[x for kv in files.items() for x in kv], "--scores", "all", "--json", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stored = load_checkpoint(ckpt)
    assert report["images"] == len(stored["val_files"]) == 13  # only the held-out images, not all of DATA
    # the checkpoint's own validation accuracy, reproduced by the shared inference pieces
    assert report["accuracy"] == pytest.approx(stored["best_metric"], abs=1 / 13 + 1e-9)
    assert report["matched_by"] == "name" and report["class_names"] == ["0", "1", "2"]
    assert set(report["top_k"]) == {"top1", "top3"}  # --topk 1,5 capped at the 3 classes
    assert report["top_k"]["top3"] == 1.0 and report["top_k"]["top1"] == report["accuracy"]
    rows = list(csv.DictReader(files["--csv"].open()))
    assert [r["class"] for r in rows] == ["0", "1", "2", "All", "Macro", "Weighted"]
    assert sum(int(r["support"]) for r in rows[:3]) == 13 and rows[3]["support"] == "13"
    assert rows[3]["precision"] == f"{report['accuracy']:.4f}"
    predicted = list(csv.DictReader(files["--save-predictions"].open()))
    assert len(predicted) == 13 and all(Path(p["path"]).parent.parent == data for p in predicted)
    matrix = [list(map(int, r[1:])) for r in list(csv.reader(files["--confusion-csv"].open()))[1:]]
    assert [sum(r) for r in matrix] == [int(r["support"]) for r in rows[:3]]
    assert files["--plot"].read_bytes()[:4] == b"\x89PNG"

    # the saved predictions (with every class's score beside them) give the same spreadsheet byte for byte,
    # and every figure of the report, with no model at all
    assert (tmp_path / "pred.scores.npy").is_file()
    again = invoke("evaluate", "--predictions", files["--save-predictions"], "--csv", tmp_path / "again.csv", "--json")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.csv").read_bytes() == files["--csv"].read_bytes()
    other = json.loads(again.stdout)
    for key in ("accuracy", "top_k", "balanced_accuracy", "ece", "loss", "averages", "per_class", "ranking",
                "calibration", "confusion_matrix"):
        assert other[key] == report[key], key
    assert report["loss"] > 0 and report["ranking"]["macro"]["auc"] is not None
    # stdin has no companion: the same report without the figures that need every class's score
    piped = runner.invoke(app, ["evaluate", "--predictions", "-", "--format", "csv"],
                          input=files["--save-predictions"].read_text())
    assert piped.exit_code == 0, piped.output
    without = list(csv.DictReader(piped.stdout.splitlines()))
    assert all(r["auc"] == r["ap"] == "" for r in without)
    assert [{k: v for k, v in r.items() if k not in ("auc", "ap")} for r in without] == \
        [{k: v for k, v in r.items() if k not in ("auc", "ap")} for r in rows]
    lines = invoke("evaluate", "--predictions", files["--save-predictions"], "--format", "jsonl").stdout.splitlines()
    first = json.loads(lines[0])  # numbers stay numbers in JSON Lines
    assert first["precision"] == round(report["per_class"][0]["precision"], 4) and isinstance(first["support"], int)
    assert [json.loads(line)["class"] for line in lines[-3:]] == ["All", "Macro", "Weighted"]
    # outputs are never replaced without --overwrite
    refused = invoke("evaluate", ckpt, "--csv", files["--csv"], *FAST)
    assert refused.exit_code == 2 and "already exists" in refused.stderr


def test_a_train_val_checkpoint_and_other_data(split_run, tmp_path):
    data, ckpt = split_run
    result = invoke("evaluate", ckpt, "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 20
    table = invoke("evaluate", ckpt, *FAST)  # the readable table: per class, then the totals
    assert table.exit_code == 0 and table.stdout.splitlines()[0].split()[:6] == \
        ["class", "label", "support", "precision", "recall", "f1"]
    assert "balanced_accuracy" in table.stdout and "ece" in table.stdout

    other = tmp_path / "other"
    shutil.copytree(data / "val", other)
    shutil.rmtree(other / "2")  # a known class without images: support 0
    (other / "3").rename(other / "3x")
    unknown = invoke("evaluate", ckpt, "--data", other, *FAST)
    assert unknown.exit_code == 2 and "class folder(s) unknown to the model: 3x" in unknown.stderr
    shutil.rmtree(other / "3x")
    fewer = invoke("evaluate", ckpt, "--data", other, "--json", *FAST)
    assert fewer.exit_code == 0, fewer.output
    per_class = json.loads(fewer.stdout)["per_class"]
    assert [c["support"] for c in per_class] == [5, 5, 0, 0]


def test_the_checkpoints_folder_gone_says_to_pass_data(split_run, tmp_path):
    data, ckpt = split_run
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    state = load_checkpoint(ckpt)
    state["val_dir"] = str(moved / "val")
    copy = tmp_path / "best.pth"
    torch.save(state, copy)
    shutil.rmtree(moved / "val")
    result = invoke("evaluate", copy, *FAST)
    assert result.exit_code == 2
    assert f"the checkpoint's validation folder {moved / 'val'} is gone" in result.stderr and "--data" in result.stderr


def test_any_classifier_with_a_weights_file_matches_folders_by_index(split_run, tmp_path):
    data, ckpt = split_run
    plain = tmp_path / "plain.pth"
    torch.save(load_checkpoint(ckpt)["model"], plain)  # a bare state_dict: no class names
    result = invoke("evaluate", "--model", "mobilenet_v3_small", "--weights", plain, "--data", data / "val", "--json",
                    "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["matched_by"] == "index" and "by sorted index" in result.stderr
    by_name = json.loads(invoke("evaluate", ckpt, "--json", *FAST).stdout)  # the same images, the same weights
    for key in ("accuracy", "per_class", "confusion_matrix"):
        assert report[key] == by_name[key], key


def test_bad_checkpoints_are_one_line(split_run, tmp_path):
    _, ckpt = split_run
    marker = tmp_path / "was_executed"
    evil = tmp_path / "evil.pth"
    torch.save({"model": load_checkpoint(ckpt)["model"], "args": Payload(str(marker))}, evil)
    result = invoke("evaluate", evil, *FAST)
    assert result.exit_code == 1 and f"refusing to load {evil}: it needs code to unpickle" in result.stderr
    assert not marker.exists(), "the file's code was executed"

    wrong = load_checkpoint(ckpt)
    wrong["classes"] = wrong["classes"] + ["extra"]
    torch.save(wrong, tmp_path / "wrong.pth")
    mismatch = invoke("evaluate", tmp_path / "wrong.pth", *FAST)
    assert mismatch.exit_code == 1 and "head has 4 outputs but the file names 5 classes" in mismatch.stderr

    (tmp_path / "empty.pth").write_bytes(b"")
    for args, message in (([tmp_path / "empty.pth"], "is empty (0 bytes)"),
                          ([tmp_path / "missing.pth"], "no such weights file"),
                          ([], "nothing to evaluate"),
                          ([ckpt, "--predictions", "p.csv"], "--predictions needs no model or images"),
                          ([ckpt, "--plot", tmp_path / "cm.jpg"], "must end in .png")):
        bad = invoke("evaluate", *args, *FAST)
        assert bad.exit_code in (1, 2) and message in bad.stderr and "Traceback" not in bad.stderr, bad.output
        assert len([ln for ln in bad.stderr.splitlines() if ln.startswith("torchtool: error:")]) == 1


def test_unreadable_images_exit_3_and_strict_exit_1(split_run, tmp_path):
    data, ckpt = split_run
    val = tmp_path / "val"
    shutil.copytree(data / "val", val)
    broken = add_broken_images(val / "1", next((val / "1").iterdir()))
    result = invoke("evaluate", ckpt, "--data", val, "--json", *FAST)
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 20 and {Path(s["path"]) for s in report["skipped"]} == set(broken)
    assert "3 of 23 images could not be read" in result.stderr
    strict = invoke("evaluate", ckpt, "--data", val, "--strict", *FAST)
    assert strict.exit_code == 1 and "cannot read" in strict.stderr
    for image in val.rglob("*.png"):
        image.write_bytes(b"")
    nothing = invoke("evaluate", ckpt, "--data", val, *FAST)  # nothing to report on: a failure, not a partial success
    assert nothing.exit_code == 1 and "none of the 23 images could be read" in nothing.stderr


def test_torchrun_counts_each_image_once(run_python, split_run, tmp_path):
    data, ckpt = split_run
    val = tmp_path / "val"
    shutil.copytree(data / "val", val)
    next((val / "0").iterdir()).unlink()  # 19 images: not divisible by 2
    common = ["-m", "torchtool", "evaluate", str(ckpt), "--data", str(val), "--json", "--workers", "0",
              "--device", "cpu", "--quiet"]
    env = {"OMP_NUM_THREADS": "1"}
    two = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *common[:2],
                     *common[2:], "--save-predictions", str(tmp_path / "two.csv"),
                     env={**env, "TMPDIR": str(tmp_path)}, timeout=GENEROUS_S)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_python(*common, "--save-predictions", str(tmp_path / "one.csv"), env=env, timeout=GENEROUS_S)
    assert one.returncode == 0, one.stderr[-3000:]
    r2, r1 = json.loads(two.stdout), json.loads(one.stdout)  # one report: only rank 0 prints
    assert r2["images"] == r1["images"] == 19
    for key in ("accuracy", "per_class", "confusion_matrix", "top_k"):
        assert r2[key] == r1[key], key
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()  # same rows, input order


# --- a plain weights file over small class folders: the checks that need no trained model ----------------

CLASS_FOLDERS = (" 2", "01", "10")  # a leading space, zero-padded, numeric: names, not indices


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, weights, nan_weights): 3 class folders of 2 digits each, a 4-output mobilenet_v3_small
    (random init, so matched by index: the report's classes are ' 2', '01', '10', '3'), and the same
    weights with a NaN output bias."""
    import torchvision

    root = tmp_path_factory.mktemp("eval_plain")
    flat = write_digits(root / "flat", labels=range(3), train_per_class=2, val_per_class=0, layout="flat")
    data = root / "data"
    data.mkdir()
    for digit, name in enumerate(CLASS_FOLDERS):
        (flat / str(digit)).rename(data / name)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4)
    torch.save(model.state_dict(), root / "w.pth")
    state = model.state_dict()
    state["classifier.3.bias"][1] = float("nan")
    torch.save(state, root / "nan.pth")
    return data, root / "w.pth", root / "nan.pth"


def plain(weights: Path, data: Path, *args):
    return invoke("evaluate", "--model", "mobilenet_v3_small", "--weights", weights, "--data", data, *args, *FAST)


@pytest.fixture
def model_calls(monkeypatch) -> list[int]:
    """Counts the batches THE inference loop runs (evaluate reaches it as infer.run)."""
    from torchtool.core import infer

    calls: list[int] = []
    real = infer.run

    def counted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            calls.append(len(batch.indices))
            yield batch

    monkeypatch.setattr(infer, "run", counted)
    return calls


def test_non_finite_outputs_are_a_failure_not_a_report(plain_model, tmp_path):
    data, _, nan = plain_model
    result = plain(nan, data, "--json", "--save-predictions", tmp_path / "p.csv")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[0] == ("torchtool: error: the model's outputs are not finite (NaN or Inf) "
                                             "for 6 of 6 images: no report")
    assert "Warning" not in result.stderr and len(result.stderr.splitlines()) == 2  # the line and its hint
    assert not (tmp_path / "p.csv").exists()


def test_saved_predictions_give_the_same_report_with_awkward_class_names(plain_model, tmp_path):
    data, weights, _ = plain_model
    first = plain(weights, data, "--json", "--csv", tmp_path / "a.csv", "--save-predictions", tmp_path / "p.csv",
                  "--scores", "all")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["class_names"] == [" 2", "01", "10", "3"] and report["images"] == 6
    again = invoke("evaluate", "--predictions", tmp_path / "p.csv", "--json", "--csv", tmp_path / "b.csv")
    assert again.exit_code == 0, again.output
    # class '3' has no image: said once, in our words
    assert again.stderr == "torchtool: 1 class has no positive image: left out of the AUC/AP averages\n"
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()
    back = json.loads(again.stdout)
    for key in ("class_names", "accuracy", "top_k", "balanced_accuracy", "ece", "loss", "averages", "per_class",
                "ranking", "calibration", "confusion_matrix"):
        assert back[key] == report[key], key
    # Excel's "CSV UTF-8" (a BOM first) on stdin reads the same (stdin has no companion: no auc/ap)
    piped = runner.invoke(app, ["evaluate", "--predictions", "-", "--format", "csv", "--quiet"],
                          input=b"\xef\xbb\xbf" + (tmp_path / "p.csv").read_bytes())
    assert piped.exit_code == 0, piped.output
    assert [r[:6] for r in csv.reader(piped.stdout.splitlines())] == \
        [r[:6] for r in csv.reader((tmp_path / "a.csv").read_text().splitlines())]


NAMES = {"--plot": "report.png", "--calibration-plot": "report.png", "--gallery": "report.png", "--html": "report.html"}


@pytest.mark.parametrize("flag", ["--csv", "--confusion-csv", "--plot", "--save-predictions", "--calibration-plot",
                                  "--gallery", "--html", "--results-file"])
def test_every_output_is_checked_before_any_image_is_read(plain_model, tmp_path, model_calls, flag):
    data, weights, _ = plain_model
    name = NAMES.get(flag, "report.csv")
    (tmp_path / "afile").write_text("a file, not a folder\n")
    for where, code in ((Path("/proc") / name, 1),  # no file can be made there, root or not
                        (tmp_path / "afile" / name, 2),
                        (tmp_path / ("n" * 300 + name), 2)):  # longer than NAME_MAX
        result = plain(weights, data, flag, where)
        assert result.exit_code == code and flag in result.stderr, result.output
        assert result.stderr.startswith("torchtool: error:") and "Traceback" not in result.stderr
        assert model_calls == [], f"{where}: the images were run before the output was refused"
    ok = plain(weights, data, flag, tmp_path / name)  # and the spy does see a run
    assert ok.exit_code == 0 and sum(model_calls) == 6


def test_picture_suffixes_and_the_scores_companion_are_checked_first(plain_model, tmp_path, model_calls):
    data, weights, _ = plain_model
    for flag, name, suffix in (("--gallery", "g.jpg", ".png"), ("--calibration-plot", "c.svg", ".png"),
                               ("--html", "r.txt", ".html or .htm")):
        result = plain(weights, data, flag, tmp_path / name)
        assert result.exit_code == 2 and f"{flag} {tmp_path / name} must end in {suffix}" in result.stderr
    (tmp_path / "p.scores.npy").write_bytes(b"")  # the companion --scores all would write
    kept = plain(weights, data, "--save-predictions", tmp_path / "p.csv", "--scores", "all")
    assert kept.exit_code == 2 and f"{tmp_path / 'p.scores.npy'} already exists" in kept.stderr
    alone = plain(weights, data, "--scores", "all")
    assert alone.exit_code == 2 and "--scores all says what --save-predictions writes" in alone.stderr
    assert model_calls == [] and not (tmp_path / "p.csv").exists()


def test_a_model_run_gives_every_new_output(plain_model, tmp_path):
    data, weights, _ = plain_model
    files = {"--gallery": tmp_path / "g.png", "--calibration-plot": tmp_path / "c.png", "--html": tmp_path / "r.html",
             "--results-file": tmp_path / "results.json", "--save-predictions": tmp_path / "p.csv"}
    result = plain(weights, data, *[x for kv in files.items() for x in kv], "--scores", "all", "--bootstrap", "50",
                   "--compare", weights, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert all(files[f].is_file() for f in files) and (tmp_path / "p.scores.npy").is_file()
    assert report["ci"]["resamples"] == 50 and report["loss"] > 0
    assert report["comparison"]["mcnemar"]["p_value"] == 1.0  # the same model: no discordant pair
    (row,) = json.loads(files["--results-file"].read_text())
    assert row["checkpoint"] == str(weights) and row["accuracy"] == round(report["accuracy"], 4)


@pytest.mark.parametrize("topk", ["", "a,b", ",", "1,x"])
def test_a_bad_topk_is_a_usage_error_before_the_run(plain_model, model_calls, topk):
    data, weights, _ = plain_model
    result = plain(weights, data, "--topk", topk)
    assert result.exit_code == 2 and model_calls == []
    assert result.stderr.splitlines()[0] == f"torchtool: error: --topk {topk!r}: expected comma-separated " \
                                            "integers such as 1,5"


def test_links_into_other_classes_are_not_followed(plain_model, tmp_path):
    data, weights, _ = plain_model
    linked = tmp_path / "linked"
    shutil.copytree(data, linked)
    (linked / "01" / "other").symlink_to(linked / "10", target_is_directory=True)  # into another class
    (linked / "01" / "root").symlink_to(linked, target_is_directory=True)  # back to the root
    one = next((linked / "10").iterdir())
    (linked / "01" / "stolen.png").symlink_to(one)  # another class's image
    outside = tmp_path / "pool"
    outside.mkdir()
    shutil.copy(one, outside / "pooled.png")
    (linked / " 2" / "pool").symlink_to(outside, target_is_directory=True)  # outside the root: followed
    result = plain(weights, linked, "--json", "--save-predictions", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [c["support"] for c in report["per_class"]] == [3, 2, 2, 0]
    rows = list(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert sorted(Path(r["path"]).relative_to(linked).as_posix() for r in rows if r["label"] == "01") == \
        sorted(f"01/{p.name}" for p in (data / "01").iterdir())


def _awkward_predictions(path: Path) -> Path:
    """A prediction file whose class names break matplotlib's text: a non-UTF-8 byte, mathtext."""
    path.write_bytes(b"label,prediction,score\nlatin\xe9,b$x$,0.5\nb$x$,b$x$,0.75\n$\\frac$,b$x$,0.25\n")
    return path


def test_the_plot_never_costs_the_report(tmp_path, monkeypatch):
    source = _awkward_predictions(tmp_path / "in.csv")
    outs = ["--plot", tmp_path / "cm.png", "--save-predictions", tmp_path / "p.csv", "--csv", tmp_path / "r.csv"]
    drawn = invoke("evaluate", "--predictions", source, *outs, "--json")
    assert drawn.exit_code == 0 and drawn.stderr == "", drawn.output
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG" and json.loads(drawn.stdout)["images"] == 3

    from torchtool.core.evaluate import outputs

    def broken(report, path):
        raise RuntimeError("matplotlib gave up\nline two of its message")

    monkeypatch.setattr(outputs, "plot_confusion", broken)
    for f in (tmp_path / "cm.png", tmp_path / "p.csv", tmp_path / "r.csv"):
        f.unlink()
    failed = invoke("evaluate", "--predictions", source, *outs, "--json")
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)["accuracy"] == pytest.approx(1 / 3)  # the report, whole, on stdout
    assert (tmp_path / "p.csv").exists() and (tmp_path / "r.csv").exists() and not (tmp_path / "cm.png").exists()
    assert failed.stderr.splitlines()[0] == (f"torchtool: error: could not draw --plot {tmp_path / 'cm.png'}: "
                                             "RuntimeError: matplotlib gave up")


def test_one_class_and_nan_scores_are_said_in_our_words(run_torchtool, tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("label,prediction,score\ncat,cat,0.9\ncat,cat,nan\n")
    result = run_torchtool("evaluate", "--predictions", str(path), "--json")  # a real process: its whole stderr
    assert result.returncode == 0 and json.loads(result.stdout)["ece"] is None
    assert result.stderr == f"torchtool: 1 of 2 scores in {path} are NaN: the report has no ece\n"
