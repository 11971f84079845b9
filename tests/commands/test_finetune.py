"""torchtool finetune from the command line: files, summary, errors, resume, real accuracy.

Kill and resume, the run lock and torchrun: test_finetune_processes.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import GENEROUS_S
from tests.finetune_data import add_broken_images, write_digits
from torchtool.cli import app
from torchtool.core.models.checkpoint import load_checkpoint, read_weights_file
from torchtool.core.models import build_model

runner = CliRunner()
# On the CPU everywhere: the figures these tests compare are CPU ones (a GPU's TF32 would differ).
SMALL = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "16",
         "--workers", "0", "--augment", "none", "--device", "cpu", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def digits_flat(tmp_path_factory) -> Path:
    """3 digits, 20 images each, all in DATA/<digit>/ (for --val-split)."""
    return write_digits(tmp_path_factory.mktemp("digits_flat"), labels=range(3), train_per_class=20,
                        val_per_class=0, layout="flat")


def invoke(*args: str):
    return runner.invoke(app, ["finetune", *map(str, args)])


def test_end_to_end_through_the_installed_executable(run_torchtool, digits4, tmp_path):
    out, export = tmp_path / "run", tmp_path / "shared" / "digits.safetensors"
    proc = run_torchtool("finetune", str(digits4), "--out", str(out), *SMALL[:-1], "--epochs", "2", "--json",
                         "--export-weights", str(export), "--label-smoothing", "0.1", "--warmup-epochs", "1",
                         timeout=GENEROUS_S)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout holds the summary and nothing else
    assert summary["epochs"] == 2 and summary["classes"] == 4 and summary["train_images"] == 64
    assert summary["val_images"] == 16 and summary["skipped_images"] == 0 and 0 <= summary["best_val_acc"] <= 1
    assert summary["best"] == str(out / "best.pth") and summary["export"] == str(export)
    assert "epoch 1/2" in proc.stderr and "epoch 2/2" in proc.stderr  # the per-epoch log lines
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,train_acc,val_loss,val_acc,val_top5,lr,seconds" and len(lines) == 3
    assert [float(line.split(",")[6]) for line in lines[1:]] == pytest.approx([0.005, 0.01])  # warm-up, then lr
    # config.json: every setting, the versions and the command line, readable without loading a checkpoint
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["label_smoothing"] == 0.1 and config["config"]["model"] == "mobilenet_v3_small"
    assert config["config"]["lr"] == 0.01 and config["config"]["weight_decay"] == 1e-4  # resolved, not None
    assert set(config["versions"]) == {"torchtool", "torch", "torchvision", "numpy", "python"}
    assert config["versions"]["torch"] == torch.__version__ and config["preprocess"]["crop_size"] == 32
    [command] = config["commands"]
    assert command["from_epoch"] == 0 and command["argv"][1:6] == ["finetune", str(digits4), "--out", str(out),
                                                                   "--model"]
    assert command["command"].startswith(f"torchtool finetune {digits4} --out {out} --model mobilenet_v3_small")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_checkpoint(out / "best.pth")
    assert best["epoch"] == summary["best_epoch"] and best["best_metric"] == summary["best_val_acc"]
    shared = read_weights_file(export)
    assert shared.arch == "mobilenet_v3_small" and shared.classes == ["0", "1", "2", "3"]
    assert shared.preprocess["crop_size"] == 32
    assert all(torch.equal(v, best["model"][k]) for k, v in shared.state_dict.items())
    assert build_model(None, str(export)).num_classes == 4  # loadable without naming the model


def test_val_split_is_stratified_and_stored_for_evaluate(digits_flat, tmp_path):
    result = invoke(digits_flat, "--out", tmp_path / "run", "--val-split", "0.25", *SMALL, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["val_images"] == 15
    ckpt = load_checkpoint(tmp_path / "run" / "last.pth")
    assert Path(ckpt["val_dir"]) == digits_flat.resolve()
    assert sorted({Path(f).parent.name for f in ckpt["val_files"]}) == ["0", "1", "2"]
    assert [sum(Path(f).parent.name == d for f in ckpt["val_files"]) for d in "012"] == [5, 5, 5]
    # Resuming needs neither --val-split nor the seed again: the same images stay held out.
    more = invoke(digits_flat, "--out", tmp_path / "run", "--resume", "--epochs", "2", "--workers", "0", "--device",
                  "cpu", "--quiet")
    assert more.exit_code == 0, more.output
    assert load_checkpoint(tmp_path / "run" / "last.pth")["val_files"] == ckpt["val_files"]


@pytest.mark.parametrize(("setup", "args", "message"), [
    (lambda d, o: o.mkdir() or (o / "metrics.csv").write_text("x"), [], "already exists"),
    (lambda d, o: None, ["--resume-from", "nowhere.pth"], "no such checkpoint"),
    (lambda d, o: None, ["--export-weights", "w.pth"], "must end in .safetensors"),
    (lambda d, o: None, ["--resume", "--overwrite"], "contradict"),
    (lambda d, o: None, ["--schedule", "multistep"], "needs --milestones"),
    (lambda d, o: None, ["--model", "resnet19"], "unknown model"),
    (lambda d, o: (d / "train" / "7").mkdir(), [], "without images"),
    (lambda d, o: shutil.copytree(d / "val" / "0", d / "val" / "8"), [], "unknown to training: 8"),
    (lambda d, o: shutil.rmtree(d / "val"), [], "no validation images"),
], ids=["out-exists", "resume-missing", "export-suffix", "resume-and-overwrite", "milestones",
        "model", "empty-class", "unknown-val-class", "no-val"])
def test_bad_inputs_fail_before_training(digits4, tmp_path, setup, args, message):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(digits4, data)
    setup(data, out)
    before = sorted(out.iterdir()) if out.exists() else None
    result = invoke(data, "--out", out, *SMALL, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.startswith("torchtool: error:")
    assert result.stdout == ""
    assert (sorted(out.iterdir()) if out.exists() else None) == before  # nothing written


def test_model_is_required_and_overwrite_starts_again(digits4, tmp_path):
    result = invoke(digits4, "--out", tmp_path / "run", "--weights", "none", "--quiet")
    assert result.exit_code == 2 and "--model is required" in result.stderr
    assert invoke(digits4, "--out", tmp_path / "run", *SMALL, "--epochs", "2").exit_code == 0
    # A finetune checkpoint as the starting point: its model, a new head for these classes.
    again = invoke(digits4, "--out", tmp_path / "again", *SMALL[2:], "--weights", tmp_path / "run" / "best.pth",
                   "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["model"] == "mobilenet_v3_small"
    clash = invoke(digits4, "--out", tmp_path / "clash", *SMALL[2:], "--model", "resnet18",
                   "--weights", tmp_path / "run" / "best.pth")
    assert clash.exit_code == 2 and "holds a mobilenet_v3_small model, not resnet18" in clash.stderr
    result = invoke(digits4, "--out", tmp_path / "run", *SMALL, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 2  # header + the new run's epoch
    assert load_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 1


def test_resume_keeps_the_runs_settings_and_takes_only_the_options_given(digits4, tmp_path):
    out = tmp_path / "run"
    first = invoke(digits4, "--out", out, *SMALL, "--epochs", "2", "--optimizer", "adamw", "--lr", "0.002",
                   "--label-smoothing", "0.1")
    assert first.exit_code == 0, first.output
    # The short form: no recipe flags, a longer run.
    more = invoke(digits4, "--out", out, "--resume", "--epochs", "3", "--workers", "0", "--device", "cpu", "--quiet")
    assert more.exit_code == 0, more.output
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["epoch"] == 3 and len((out / "metrics.csv").read_text().splitlines()) == 4
    config = ckpt["config"]
    assert (config["optimizer"], config["lr"], config["label_smoothing"], config["image_size"]) == \
        ("adamw", 0.002, 0.1, 32)
    assert "epochs 2 -> 3" in more.stderr and "optimizer" not in more.stderr  # only what changed is reported
    assert "differ from those the run started with" not in more.stderr  # the same images
    lrs = [float(line.split(",")[6]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    # epochs 1-2 on a 2-epoch cosine, epoch 3 where a 3-epoch cosine would be (not restarting, not flat at 0)
    assert lrs == pytest.approx([0.002, 0.001, 0.002 * (1 + math.cos(2 * math.pi / 3)) / 2])
    clash = invoke(digits4, "--out", out, "--resume", "--optimizer", "sgd", "--epochs", "4", "--quiet")  # the default
    assert clash.exit_code == 2 and "cannot resume with a different --optimizer" in clash.stderr


def test_resume_with_an_option_equal_to_its_default_takes_it(digits4, tmp_path):
    out = tmp_path / "run"
    assert invoke(digits4, "--out", out, *SMALL, "--epochs", "2").exit_code == 0
    # --epochs 10 is the default: it still counts as given, so the run is extended to 10 epochs.
    more = invoke(digits4, "--out", out, "--resume", "--epochs", "10", "--workers", "0", "--device", "cpu", "--quiet",
                  "--json")
    assert more.exit_code == 0, more.output
    assert json.loads(more.stdout)["epochs"] == 10 and load_checkpoint(out / "last.pth")["epoch"] == 10
    assert "epochs 2 -> 10" in more.stderr
    # Options left out keep the run's values, whatever their defaults: --image-size stays 32.
    assert load_checkpoint(out / "last.pth")["config"]["image_size"] == 32


def test_resume_says_when_the_images_changed(digits4, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(digits4, data)
    assert invoke(data, "--out", out, *SMALL).exit_code == 0
    first = sorted((data / "train" / "0").iterdir())
    shutil.copy(first[0], data / "train" / "1" / "new-a.png")
    shutil.copy(first[1], data / "train" / "2" / "new-b.png")
    first[2].unlink()
    (data / "val" / "3" / "extra.png").write_bytes(first[3].read_bytes())
    more = invoke(data, "--out", out, "--resume", "--epochs", "2", "--workers", "0", "--device", "cpu", "--quiet")
    assert more.exit_code == 0, more.output
    assert (f"the images in {data} differ from those the run started with (train: 2 added, 1 removed; "
            "val: 1 added, 0 removed)") in more.stderr
    files = load_checkpoint(out / "last.pth")["image_files"]  # the resumed run records what it trained on now
    assert "1/new-a.png" in files["train"] and "0/" + first[2].name not in files["train"] and "3/extra.png" in files["val"]


def test_warmup_as_long_as_the_run_warms_up_the_whole_run(digits4, tmp_path):
    result = invoke(digits4, "--out", tmp_path / "run", *SMALL, "--epochs", "2", "--warmup-epochs", "2")
    assert result.exit_code == 0, result.output
    assert "--warmup-epochs 2 covers the whole run" in result.stderr
    lrs = [float(line.split(",")[6]) for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([0.01 / 3, 0.02 / 3])  # LinearLR from lr/(N+1), never reaching the cosine


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "table"])
def test_summary_honours_format(digits4, tmp_path, fmt):
    result = invoke(digits4, "--out", tmp_path / "run", *SMALL, "--format", fmt)
    assert result.exit_code == 0, result.output
    if fmt == "csv":
        header, row = result.stdout.splitlines()
        record = dict(zip(header.split(","), row.split(",")))
        assert record["epochs"] == "1" and record["classes"] == "4" and record["model"] == "mobilenet_v3_small"
    elif fmt == "jsonl":
        (line,) = result.stdout.splitlines()
        assert json.loads(line)["epochs"] == 1 and json.loads(line)["skipped"] == []
    else:
        assert result.stdout.splitlines()[0].split() == ["model", "mobilenet_v3_small"]


def test_a_full_disk_says_which_file(digits4, mount_tmpfs):
    disk = mount_tmpfs("2m")  # mobilenet_v3_small's checkpoint (weights and optimizer state) needs ~12 MB
    result = invoke(digits4, "--out", disk / "run", *SMALL)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == f"torchtool: error: no space left on device while writing " \
                                            f"{disk / 'run' / 'last.pth'}"
    assert "enforce fail" not in result.stderr and "Traceback" not in result.stderr
    assert not list((disk / "run").glob(".*.tmp"))


def test_out_that_is_a_file_or_read_only_is_one_line(digits4, tmp_path, mount_tmpfs):
    (tmp_path / "taken").write_text("x")
    as_file = invoke(digits4, "--out", tmp_path / "taken", *SMALL)
    assert as_file.exit_code == 2 and f"--out {tmp_path / 'taken'} is a file" in as_file.stderr
    readonly = mount_tmpfs("1m", ro=True)
    denied = invoke(digits4, "--out", readonly / "run", *SMALL)
    assert denied.exit_code == 1
    assert f"cannot write to --out {readonly / 'run'}: read-only file system" in denied.stderr


def test_a_diverging_run_fails_and_keeps_the_last_good_checkpoint(digits4, tmp_path):
    out = tmp_path / "run"
    assert invoke(digits4, "--out", out, *SMALL).exit_code == 0
    diverged = invoke(digits4, "--out", out, "--resume", "--epochs", "2", "--lr", "1e30", "--workers", "0", "--device",
                      "cpu", "--quiet")
    assert diverged.exit_code == 1, diverged.output
    error = [line for line in diverged.stderr.splitlines() if line.startswith("torchtool: error:")]
    assert len(error) == 1 and error[0].startswith("torchtool: error: the training loss is not finite at epoch 2, batch ")
    assert "--lr" in diverged.stderr and "--clip-grad-norm" in diverged.stderr and diverged.stdout == ""
    assert load_checkpoint(out / "last.pth")["epoch"] == 1  # the diverged epoch was never saved
    assert len((out / "metrics.csv").read_text().splitlines()) == 2


def test_an_epoch_without_one_readable_image_fails(digits4, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits4, data)
    for image in (data / "train").rglob("*.png"):
        image.write_bytes(b"")
    result = invoke(data, "--out", tmp_path / "run", *SMALL)
    assert result.exit_code == 1, result.output
    assert "epoch 1: no training image could be read" in result.stderr
    assert not (tmp_path / "run" / "last.pth").exists()


@pytest.mark.parametrize("args", [["--lr", "nan"], ["--weight-decay", "inf"], ["--schedule", "step", "--milestones", "0"],
                                  ["--batch-size", str(2**64)]],
                         ids=["lr-nan", "wd-inf", "milestone-0", "batch-past-maxsize"])
def test_values_are_checked_before_out_exists(digits4, tmp_path, args):
    result = invoke(digits4, "--out", tmp_path / "run", *SMALL, *args)
    assert result.exit_code == 2, result.output
    assert "must be" in result.stderr or "Invalid value" in result.stderr or "count from 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_command_defaults_are_the_configs_defaults():
    import dataclasses
    import inspect

    from torchtool.commands.finetune import run
    from torchtool.core.train.config import RESUMABLE, TrainConfig

    options = {name: p.default for name, p in inspect.signature(run).parameters.items()}
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE or f.name == "milestones":
            continue
        assert options[f.name] == f.default, f.name  # one default for the command and for Python callers
    assert options["milestones"] == "" and TrainConfig(data=".", out=".").milestones == []


def test_unreadable_images_exit_3_and_strict_exit_1(digits4, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits4, data)
    broken = add_broken_images(data / "train" / "2", next((data / "train" / "2").iterdir()))
    result = invoke(data, "--out", tmp_path / "run", *SMALL, "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped_images"] == 3 and {Path(s["path"]) for s in summary["skipped"]} == set(broken)
    assert "3 unreadable image(s) skipped (3 training, 0 validation)" in result.stderr  # even with --quiet
    assert (tmp_path / "run" / "best.pth").is_file()  # the epoch still finished and was saved
    strict = invoke(data, "--out", tmp_path / "strict", *SMALL, "--strict")
    assert strict.exit_code == 1
    assert "cannot read" in strict.stderr and "zz_" in strict.stderr and "Traceback" not in strict.stderr


def test_fifos_and_folders_named_like_images_are_skipped_not_waited_for(run_torchtool, digits4, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits4, data)
    os.mkfifo(data / "train" / "1" / "stalled.png")  # opening it for reading would block forever
    os.mkfifo(data / "val" / "2" / "stalled.png")
    (data / "train" / "3" / "folder.png").mkdir()  # walked (it is empty), never opened as an image
    args = [a for a in SMALL if a != "--quiet"]
    proc = run_torchtool("finetune", str(data), "--out", str(tmp_path / "run"), *args, "--workers", "1", "--json",
                         timeout=GENEROUS_S)  # only a loader that waits on a FIFO forever reaches it
    assert proc.returncode == 3, proc.stderr
    skipped = {s["path"]: s["error"] for s in json.loads(proc.stdout)["skipped"]}
    assert skipped == {str(data / "train" / "1" / "stalled.png"): "not a regular file: a FIFO",
                       str(data / "val" / "2" / "stalled.png"): "not a regular file: a FIFO"}
    assert "2 unreadable image(s) skipped (1 training, 1 validation)" in proc.stderr


def test_tensorboard_missing_says_how_to_install(digits4, tmp_path):
    if importlib.util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed here")
    result = invoke(digits4, "--out", tmp_path / "run", *SMALL[:-1], "--tensorboard")
    assert result.exit_code == 0
    assert "pip install tensorboard" in result.stderr and (tmp_path / "run" / "metrics.csv").is_file()


@pytest.fixture(scope="module")
def all_digits(tmp_path_factory) -> Path:
    """All 1,797 digits, 20% of each class held out for validation, 32 px."""
    return write_digits(tmp_path_factory.mktemp("all_digits"))


@pytest.mark.slow
def test_resnet18_from_scratch_reaches_90_percent_on_real_digits_in_3_epochs(all_digits, tmp_path):
    # the whole 32 px digit (--crop-pct 1.0): the 224/256 default crop cuts its border off, and needs 5 epochs.
    # A seeded run repeats on the same hardware only (0.9415 on an AMD EPYC, >= 0.95 where this test was
    # written): the bound leaves room for that; benchmarks/finetune.py measures the claim (>= 0.985 in 5 epochs).
    result = invoke(all_digits, "--out", tmp_path / "run", "--model", "resnet18", "--weights", "none",
                    "--image-size", "32", "--crop-pct", "1.0", "--augment", "none", "--epochs", "3",
                    "--batch-size", "64", "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.01",
                    "--workers", "0", "--seed", "0", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["train_images"] + summary["val_images"] == 1797
    assert summary["best_val_acc"] >= 0.90, summary  # chance is 0.10
    assert summary["epochs"] == 3 and summary["best_val_acc"] <= summary["best_val_top5"] <= 1
