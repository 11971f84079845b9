"""The training loop and its recipes, through ``torchtool.core.train`` (finetune from Python)."""

from __future__ import annotations

import csv
import math
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch

from tests.finetune_data import add_broken_images, write_digits, write_photo_classes
from torchtool.core.train import epoch as train_mod
from torchtool.core.models.checkpoint import load_checkpoint
from torchtool.core.data.loading import ImageDataset
from torchtool.core.data.transforms import eval_transform
from torchtool.core.runtime import seed_everything
from torchtool.core.models import build_model, find_head
from torchtool.core.output import Failure, UsageError
from torchtool.core.runtime import determinism
from torchtool.core.train import TrainConfig, fit
from torchtool.core.train.recipes import EpochSchedule, build_optimizer, param_groups
from torchtool.core.data.folders import find_splits, stratified_split


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """4 digits, 16 train + 4 val images each, 32 px."""
    return write_digits(tmp_path_factory.mktemp("small_digits"), labels=range(4), train_per_class=16,
                        val_per_class=4)


@pytest.fixture(scope="session")
def photo_classes(tmp_path_factory) -> Path:
    return write_photo_classes(tmp_path_factory.mktemp("photo_classes"))


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="mobilenet_v3_small", weights="none", epochs=1, batch_size=16, workers=0, image_size=32,
                augment="none", lr=0.05, seed=0, device="cpu")  # CPU references, also on GPU machines
    return TrainConfig(data=str(data), out=str(out), **{**base, **kw})


# Schedules stepped without training steps, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")


def metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


# --- recipes -------------------------------------------------------------------------------------


def _is_norm(module: torch.nn.Module) -> bool:
    return "Norm" in type(module).__name__


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "convnext_tiny"])
def test_no_weight_decay_on_biases_and_norm_parameters(arch):
    built = build_model(arch, "none", num_classes=3)
    model = built.model
    cfg = TrainConfig(data=".", out=".", weight_decay=0.01, lr=0.1, backbone_lr=0.01)
    optimizer = build_optimizer(param_groups(model, built.head, cfg), cfg)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    head_params = {id(p) for p in model.get_submodule(built.head).parameters()}
    assert len(group_of) == sum(1 for _ in model.parameters())
    assert norm_params, f"{arch} has normalisation layers"
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        expect_decay = not (name.endswith("bias") or id(p) in norm_params)
        assert group["weight_decay"] == (0.01 if expect_decay else 0.0), name
        assert group["lr"] == (0.1 if id(p) in head_params else 0.01), name
    cfg_all = TrainConfig(data=".", out=".", weight_decay=0.01, decay_all=True)
    assert all(g["weight_decay"] == 0.01 for g in param_groups(model, built.head, cfg_all))


def test_the_new_head_fits_the_classes_for_every_family(photo_classes, tmp_path):
    for arch, head in [("squeezenet1_0", "classifier.1"), ("mobilenet_v3_small", "classifier.3"),
                       ("resnet18", "fc")]:
        out = tmp_path / arch
        summary = fit(config(photo_classes, out, model=arch, image_size=64, batch_size=8))
        assert summary["classes"] == 2
        built = build_model(None, str(out / "best.pth"))  # what evaluate / extract-features do
        assert built.arch == arch and built.classes == ["china", "flower"] and built.num_classes == 2
        assert find_head(built.model)[0] == head
        assert built.preprocess.crop_size == 64
        with torch.no_grad():
            assert built.model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_frozen_backbone_is_unchanged_after_an_epoch(small_digits, tmp_path, resnet18_weights_pth):
    out = tmp_path / "run"
    fit(config(small_digits, out, model="resnet18", weights=str(resnet18_weights_pth), freeze_backbone=True,
               lr=0.5))
    after = load_checkpoint(out / "last.pth")
    seed_everything(0)  # fit seeds the same way before building, so this is its starting point
    before = build_model("resnet18", str(resnet18_weights_pth), num_classes=4).model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after["model"][k])}
    assert changed == {"fc.weight", "fc.bias"}  # BatchNorm running statistics stay frozen too
    assert [len(g["params"]) for g in after["optimizer"]["param_groups"]] == [1, 1]  # fc weight, fc bias


def _lrs(cfg: TrainConfig, accs=None) -> list[float]:
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.lr,
                                  "weight_decay": 0.0}], cfg)
    schedule, lrs = EpochSchedule(optimizer, cfg), []
    for epoch in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step(accs[epoch] if accs else 0.0)
    return lrs


def test_warmup_then_cosine_per_epoch():
    lrs = _lrs(TrainConfig(data=".", out=".", lr=0.1, epochs=8, warmup_epochs=2, schedule="cosine"))
    expected = [0.1 / 3, 0.2 / 3] + [0.1 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("kw", "expected"), [
    (dict(schedule="step", milestones=[3], gamma=0.5), [0.1] * 3 + [0.05] * 3 + [0.025] * 2),
    (dict(schedule="multistep", milestones=[3, 6], warmup_epochs=1), [0.05, 0.1, 0.1] + [0.01] * 3 + [0.001] * 2),
    (dict(schedule="none", warmup_epochs=3), [0.025, 0.05, 0.075] + [0.1] * 5),
    (dict(schedule="none"), [0.1] * 8),
], ids=["step", "multistep-after-warmup", "warmup-only", "constant"])
def test_step_schedules_per_epoch(kw, expected):
    assert _lrs(TrainConfig(data=".", out=".", lr=0.1, epochs=8, **kw)) == pytest.approx(expected, rel=1e-9)


def test_plateau_watches_validation_accuracy_after_warmup():
    cfg = TrainConfig(data=".", out=".", lr=0.1, epochs=8, warmup_epochs=1, schedule="plateau", gamma=0.5,
                      plateau_patience=1)
    accs = [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]
    assert _lrs(cfg, accs) == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025], rel=1e-9)


def test_library_warnings_are_said_once_in_our_words(tmp_path, capsys):
    import warnings

    from torchtool.core.train.plots import plot_curves

    cfg = TrainConfig(data=".", out=".", lr=0.1, epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _lrs(cfg)  # no optimizer step at all: what fp16 mixed precision does when every step overflows
        # a loss of exactly 0 and a validation loss that is NaN: matplotlib would refuse the log axis
        rows = [{"epoch": e, "train_loss": 0.0, "val_loss": math.nan, "train_acc": 1.0, "val_acc": 0.5, "lr": 0.1}
                for e in (1, 2)]
        plot_curves(rows, tmp_path / "curves.png")
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert err.count("torchtool: epoch 1 took no optimizer step") == 1 and "lr_scheduler" not in err
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_schedule_state_round_trips():
    cfg = TrainConfig(data=".", out=".", lr=0.1, epochs=8, warmup_epochs=2, schedule="cosine")
    full = _lrs(cfg)

    def fresh():
        opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1, "weight_decay": 0.0}],
                              cfg)
        return opt, EpochSchedule(opt, cfg)

    opt, first = fresh()
    for _ in range(3):
        first.step(0.0)
    opt2, second = fresh()  # what resume does: build both, then load both states
    opt2.load_state_dict(opt.state_dict())
    second.load_state_dict(first.state_dict())
    rest = []
    for _ in range(5):
        rest.append(opt2.param_groups[0]["lr"])
        second.step(0.0)
    assert rest == pytest.approx(full[3:], rel=1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_label_smoothed_training_loss_matches_a_reference(small_digits, tmp_path, eps):
    out = tmp_path / "run"
    # lr 0 and one batch holding every image: the reported loss is the loss of the starting model.
    fit(config(small_digits, out, model="resnet18", lr=0.0, batch_size=64, label_smoothing=eps))
    splits = find_splits(small_digits, None, 0)
    model = build_model(None, str(out / "last.pth")).model.train()  # weights untouched at lr 0
    ds = ImageDataset(splits.train_paths, eval_transform(32, 37, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                      splits.train_targets)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        logp = model(images).log_softmax(1)
    target = torch.tensor(splits.train_targets)
    reference = (-(1 - eps) * logp.gather(1, target[:, None])[:, 0] - eps * logp.mean(1)).mean()
    assert metrics(out)[0]["train_loss"] == pytest.approx(float(reference), rel=1e-4)


def _grad_norms(monkeypatch) -> list[float]:
    norms: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, closure)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    return norms


def test_clipping_bounds_the_gradient_norm(small_digits, tmp_path, monkeypatch):
    norms = _grad_norms(monkeypatch)
    fit(config(small_digits, tmp_path / "free"))
    assert max(norms) > 0.5, "the unclipped gradients must be larger than the bound for this test to mean anything"
    norms.clear()
    fit(config(small_digits, tmp_path / "clipped", clip_grad_norm=0.5))
    assert len(norms) == 4 and max(norms) <= 0.5 * (1 + 1e-5)


def test_l1_pulls_weights_towards_zero(small_digits, tmp_path):
    def weights_l1(out: Path) -> float:
        state = load_checkpoint(out / "last.pth")["model"]
        return sum(float(v.abs().sum()) for k, v in state.items() if k.endswith("weight") and v.ndim > 1)

    fit(config(small_digits, tmp_path / "plain", weight_decay=0.0))
    fit(config(small_digits, tmp_path / "l1", weight_decay=0.0, l1=0.01))
    assert weights_l1(tmp_path / "l1") < 0.97 * weights_l1(tmp_path / "plain")


def test_early_stopping_and_its_resume(small_digits, tmp_path):
    out = tmp_path / "run"
    frozen = dict(epochs=5, lr=0.0, freeze_backbone=True, patience=1)  # nothing changes: no better epoch after 1
    summary = fit(config(small_digits, out, **frozen))
    assert summary["stopped_early"] and summary["epochs"] == 2 and summary["best_epoch"] == 1
    again = fit(config(small_digits, out, **frozen), resume=True)
    assert again["stopped_early"] and again["epochs"] == 2 and len(metrics(out)) == 2


# --- checkpoints ---------------------------------------------------------------------------------


def test_a_failed_checkpoint_write_keeps_the_previous_one(small_digits, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(Path(f).name)
        if sum(".last.pth." in c for c in calls) == 2:  # epoch 2's last.pth: half a file, then the disk fills up
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(Failure, match=f"^no space left on device while writing {out / 'last.pth'}$"):
        fit(config(small_digits, out, epochs=3))
    assert load_checkpoint(out / "last.pth")["epoch"] == 1
    assert load_checkpoint(out / "best.pth")["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pth", "config.json", "curves.png", "last.pth", "metrics.csv"]
    assert [r["epoch"] for r in metrics(out)] == [1.0]


def test_checkpoint_holds_plain_types_and_everything_to_resume(small_digits, tmp_path):
    out = tmp_path / "run"
    fit(config(small_digits, out, epochs=2, optimizer="adamw", lr=1e-3))
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert {"format", "arch", "classes", "model", "preprocess", "config", "epoch", "best_metric", "best_epoch",
            "optimizer", "scheduler", "scaler", "rng", "val_dir", "history"} <= set(ckpt)
    assert ckpt["arch"] == "mobilenet_v3_small" and ckpt["classes"] == ["0", "1", "2", "3"]
    assert ckpt["epoch"] == 2 and ckpt["config"]["optimizer"] == "adamw" and ckpt["config"]["lr"] == 1e-3
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["preprocess"]["crop_size"] == 32 and ckpt["preprocess"]["resize_size"] == 37
    assert Path(ckpt["val_dir"]).is_absolute() and Path(ckpt["val_dir"]) == (small_digits / "val").resolve()
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["best_metric"] == max(r["val_acc"] for r in ckpt["history"])


def test_resume_after_an_interruption_ends_with_identical_weights(small_digits, tmp_path, monkeypatch):
    recipe = dict(model="mobilenet_v3_small", epochs=3, augment="light", mixup=0.2, rcm=2, deterministic=True,
                  optimizer="adamw", lr=2e-3, warmup_epochs=1)  # dropout, mixup, crops and RCM all draw randoms
    fit(config(small_digits, tmp_path / "straight", **recipe))

    calls = []
    real_epoch = train_mod.train_one_epoch

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of epoch 2
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        fit(config(small_digits, tmp_path / "resumed", **recipe))
    monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)
    assert load_checkpoint(tmp_path / "resumed" / "last.pth")["epoch"] == 1
    fit(config(small_digits, tmp_path / "resumed", **{**recipe, "workers": 2}), resume=True)  # workers may differ
    assert not multiprocessing.active_children(), "loader workers outlived fit()"

    a, b = load_checkpoint(tmp_path / "straight" / "last.pth"), load_checkpoint(tmp_path / "resumed" / "last.pth")
    assert a["epoch"] == b["epoch"] == 3
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["history"]]
    assert [r["epoch"] for r in metrics(tmp_path / "resumed")] == [1.0, 2.0, 3.0]


# --- data ----------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_and_proportional():
    targets = [0] * 50 + [1] * 10 + [2] * 2 + [3] * 1
    train, val = stratified_split(targets, 0.2, seed=7)
    assert sorted(train + val) == list(range(len(targets)))
    assert len(val) == 13  # scikit-learn's ceil(0.2 x the 62 images that can be split)
    per_class = [sum(targets[i] == c for i in val) for c in range(4)]
    assert all(abs(n - 0.2 * size) <= 1 for n, size in zip(per_class[:3], (50, 10, 2)))  # stratified
    assert per_class[3] == 0  # a lone image stays in training
    assert stratified_split(targets, 0.2, seed=7) == (train, val)
    assert stratified_split(targets, 0.2, seed=8)[1] != val
    with pytest.raises(UsageError, match="cannot hold out every class"):
        stratified_split([0] * 20 + [1] * 20 + [2] * 20, 0.02, seed=0)  # 2 held out, 3 classes


def test_unreadable_images_are_skipped_and_listed(photo_classes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photo_classes, data)
    source = next((data / "train" / "china").glob("*.jpg"))
    broken = add_broken_images(data / "train" / "china", source)
    (data / "val" / "flower" / "zz_empty.png").write_bytes(b"")
    summary = fit(config(data, tmp_path / "run", epochs=2, batch_size=4, image_size=64))
    assert summary["epochs"] == 2 and summary["skipped_images"] == 4
    assert {Path(s["path"]) for s in summary["skipped"] if s["split"] == "train"} == set(broken)
    assert all(s["error"] for s in summary["skipped"])
    val_acc = metrics(tmp_path / "run")[0]["val_acc"]
    assert val_acc * 4 == pytest.approx(round(val_acc * 4))  # out of the 4 readable validation images
    with pytest.raises(Failure, match="cannot read"):
        fit(config(data, tmp_path / "strict", strict=True, batch_size=4, image_size=64))


@pytest.mark.parametrize(("make", "message"), [
    (lambda r: (r / "a").mkdir(parents=True) or (r / "b").mkdir(), "no images"),
    (lambda r: None, "no class folders"),
], ids=["no-images", "no-classes"])
def test_data_without_images_is_refused(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UsageError, match=message):
        find_splits(tmp_path, 0.2, 0)


def test_empty_and_unknown_classes_are_refused(small_digits, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_digits, data)
    (data / "train" / "9").mkdir()
    with pytest.raises(UsageError, match="without images in .*: 9$"):
        find_splits(data, None, 0)
    (data / "train" / "9").rmdir()
    shutil.copytree(data / "val" / "3", data / "val" / "7")
    with pytest.raises(UsageError, match="unknown to training: 7"):
        find_splits(data, None, 0)
    with pytest.raises(UsageError, match="no validation images") as excinfo:
        find_splits(small_digits / "train", None, 0)
    assert "--val-split" in excinfo.value.hint


def test_determinism_flags_are_restored():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with determinism(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
