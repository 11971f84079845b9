"""What timm's train.py users expect of finetune, piece by piece: crop-pct, top-5, EMA, presets, --keep-best."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from torchtool.core.infer import BadInputs
from torchtool.core.models.preprocess import Preprocess
from torchtool.core.output import UsageError
from torchtool.core.train import augment, epoch as epochs
from torchtool.core.train.config import TrainConfig
from torchtool.core.train.recipes import Ema
from torchtool.core.train.state import Best

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("crop, pct, resize", [(224, 0.875, 256), (224, 1.0, 224), (32, 1.0, 32), (224, 0.9, 248),
                                               (384, 0.95, 404)])
def test_crop_pct_sets_the_resize_as_timm_does(crop, pct, resize):
    pre = Preprocess(224, 256).resized(crop, crop_pct=pct, interpolation="bicubic")
    assert (pre.crop_size, pre.resize_size, pre.interpolation) == (crop, resize, "bicubic")  # floor(crop / pct)


def test_crop_pct_and_interpolation_are_checked():
    with pytest.raises(UsageError, match="crop-pct"):
        Preprocess().resized(32, crop_pct=1.5)
    with pytest.raises(UsageError, match="interpolation"):
        Preprocess().resized(32, interpolation="lanczos")
    with pytest.raises(UsageError, match="crop-pct"):
        TrainConfig("d", "o", crop_pct=0.0)


def _step(model, lr=0.1, ema=None):
    cfg = TrainConfig("d", "o", optimizer="sgd", lr=lr, weight_decay=0.0)
    return epochs.Step(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), nn.CrossEntropyLoss(),
                       torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"), cfg, [], [], False,
                       ema=ema)


def test_top5_matches_a_hand_count():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 8)).astype(np.float32)
    targets = rng.integers(0, 8, 50)
    batches = [(torch.from_numpy(logits[i:i + 16]), torch.from_numpy(targets[i:i + 16]),
                torch.arange(i, min(i + 16, 50)), [""] * len(logits[i:i + 16])) for i in range(0, 50, 16)]
    step = _step(nn.Linear(8, 8))
    with torch.no_grad():  # the identity: the "images" are the logits
        step.model.weight.copy_(torch.eye(8))
        step.model.bias.zero_()
    sums = epochs.validate(step.model, batches, step, BadInputs(range(50), False), _Bar()).tolist()
    ranks = (-logits).argsort(axis=1)
    top1 = sum(ranks[i, 0] == targets[i] for i in range(50))
    top5 = sum(targets[i] in ranks[i, :5] for i in range(50))
    assert sums[1:] == [top1, top5, 50] and top5 > top1


def test_top5_is_capped_at_the_class_count():
    step = _step(nn.Linear(3, 3))
    batch = [(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6), [""] * 6)]
    assert epochs.validate(step.model, batch, step, BadInputs(range(6), False), _Bar())[2] == 6  # top-3 of 3


class _Bar:
    disable = True

    def update(self, n):
        pass


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_the_ema_follows_every_optimizer_step_with_the_decay():
    model, decay = _net(), 0.8
    step = _step(model, ema=Ema(model, decay))
    snapshots = []
    step.optimizer.register_step_post_hook(lambda *_: snapshots.append(copy.deepcopy(model.state_dict())))
    torch.manual_seed(1)
    loader = [(torch.randn(8, 3, 12, 12), torch.randint(0, 3, (8,)), torch.arange(8 * b, 8 * b + 8), [""] * 8)
              for b in range(5)]
    epochs.train_one_epoch(step, loader, BadInputs(range(40), False), _Bar())
    assert len(snapshots) == 5
    expected = {k: v.clone().double() for k, v in snapshots[0].items()}  # the first step copies the weights
    for snap in snapshots[1:]:
        for k, v in snap.items():
            expected[k] = decay * expected[k] + (1 - decay) * v.double()
    got = step.ema.module.state_dict()
    for k, v in expected.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-6), k  # parameters and BatchNorm statistics
    assert not torch.equal(got["5.weight"], model.state_dict()["5.weight"])  # an average, not a copy
    assert int(step.ema.state_dict()["n_averaged"]) == 5


def test_best_ranks_epochs_and_keeps_only_n():
    best = Best(keep=3)
    places = [best.add(m, e) for e, m in enumerate([0.5, 0.7, 0.6, 0.7, 0.4, 0.9], start=1)]
    assert places == [0, 0, 1, 1, None, 0]  # a tie keeps the earlier epoch ahead
    assert best.ranked == [[0.9, 6], [0.7, 2], [0.7, 4]] and (best.metric, best.epoch) == (0.9, 6)


def test_keep_best_moves_the_checkpoints_it_beats_down_a_place(tmp_path):
    from types import SimpleNamespace

    from torchtool.core.models.checkpoint import load_checkpoint
    from torchtool.core.train import state

    model = nn.Linear(2, 2)
    step, schedule = _step(model), SimpleNamespace(state_dict=dict)
    splits = SimpleNamespace(classes=["a", "b"], val_dir=str(tmp_path), val_files=[])
    run = state.Run(TrainConfig("d", str(tmp_path), keep_best=3), tmp_path, splits, "linear", None, None, None, False,
                    preprocess=Preprocess(), image_files={})
    best, held = Best(keep=3), []
    # better, better, better, worse, then between the best two: each better epoch pushes the others down
    for epoch, metric in enumerate([0.5, 0.6, 0.7, 0.4, 0.65], start=1):
        state.save(run, step, schedule, model, epoch=epoch, best=best, history=[], rng=[],
                   at=best.add(metric, epoch), source="model")
        held.append({p.name: load_checkpoint(p)["epoch"] for p in sorted(tmp_path.glob("best*.pth"))})
    three = {"best.pth": 3, "best-2.pth": 2, "best-3.pth": 1}
    assert held == [{"best.pth": 1}, {"best.pth": 2, "best-2.pth": 1}, three, three,
                    {"best.pth": 3, "best-2.pth": 5, "best-3.pth": 2}]
    assert load_checkpoint(tmp_path / "last.pth")["best_ranked"] == [[0.7, 3], [0.65, 5], [0.6, 2]]


def test_a_loss_that_turns_non_finite_on_the_last_batch_fails_the_epoch():
    from torchtool.core.output import Failure

    step = _step(_net())
    torch.manual_seed(1)
    loader = [(torch.randn(8, 3, 12, 12), torch.randint(0, 3, (8,)), torch.arange(8 * b, 8 * b + 8), [""] * 8)
              for b in range(4)]
    loader[-1][0][0, 0, 0, 0] = float("inf")  # one pixel of the epoch's last batch: its loss is NaN
    sums, first_bad = epochs.train_one_epoch(step, loader, BadInputs(range(32), False), _Bar())
    assert sums.tolist()[2:] == [1, 32] and int(first_bad) == 3  # the last batch alone, counted and located
    with pytest.raises(Failure, match="^the training loss is not finite at epoch 2, batch 4: the run diverged$"):
        epochs.check_epoch(sums.tolist(), first_bad, 2)


def _photo(size=96):
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("flower.jpg")).resize((size + 20, size))


@pytest.mark.parametrize("preset", ["randaugment", "trivialaugment", "autoaugment", "standard", "light", "none"])
def test_every_preset_runs_and_is_reproducible_with_a_seed(preset):
    tf = augment.train_transform(preset, 64, 73, MEAN, STD, color_jitter=0.4, random_erasing=0.5)
    photo = _photo()
    outs = {}
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outs.setdefault(seed, []).append(tf(photo))
    assert all(o.shape == (3, 64, 64) and o.dtype == torch.float32 for v in outs.values() for o in v)
    assert torch.equal(outs[0][0], outs[0][1])  # the same seed, the same sample
    assert any(not torch.equal(outs[0][0], outs[s][0]) for s in (1, 2, 3))


def test_the_policies_are_torchvisions():
    from torchvision.transforms import v2

    kinds = {p: [type(t) for t in augment.train_transform(p, 64, 73, MEAN, STD).transforms]
             for p in ("randaugment", "trivialaugment", "autoaugment")}
    assert v2.RandAugment in kinds["randaugment"] and v2.TrivialAugmentWide in kinds["trivialaugment"]
    assert v2.AutoAugment in kinds["autoaugment"] and v2.RandomResizedCrop in kinds["autoaugment"]
    extra = [type(t) for t in augment.train_transform("none", 64, 73, MEAN, STD, color_jitter=0.3,
                                                      random_erasing=0.25).transforms]
    assert v2.ColorJitter in extra and extra[-1] is v2.RandomErasing  # erasing last, on the normalised tensor
