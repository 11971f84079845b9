"""--fast-decode: JPEGs decoded at a reduced DCT scale that still covers the resize, close to the exact path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from torchtool.cli import app
from torchtool.core.data.images import DecodeFloor, load_image
from torchtool.core.data.transforms import CenterCrop


def _photo(path, size, fmt="JPEG"):
    """A sample photo upscaled to ``size`` with sensor-like noise, saved as a camera would (JPEG q92)."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(0)
    base = Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.BICUBIC)
    noisy = np.asarray(base).astype(np.float32) + rng.normal(0, 4, (size[1], size[0], 3))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("size, expected", [((4032, 3024), (504, 378)),  # 1/8: a 12 MP phone photo
                                            ((1512, 2016), (378, 504)),  # 1/4, portrait
                                            ((1100, 800), (550, 400)),  # 1/2
                                            ((700, 500), (700, 500)), ((300, 200), (300, 200))])  # in full
def test_the_largest_scale_that_still_covers_the_resize(tmp_path, size, expected):
    img = load_image(_photo(tmp_path / "p.jpg", size), decode=DecodeFloor(256))
    assert img.size == expected
    assert min(img.size) >= min(256, min(size))  # never below the resize target (or the photo itself)
    if img.size != size:
        assert min(img.size) // 2 < 256 or min(size) // min(img.size) == 8  # one more halving would be too small


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 9000), height=st.integers(1, 9000), side=st.integers(1, 600),
       area=st.integers(0, 2_000_000))
def test_the_scale_meets_both_bounds_and_is_the_largest_that_does(width, height, side, area):
    floor = DecodeFloor(side, area)
    x = floor.scale(width, height)
    assert x in (1, 2, 4, 8)
    w, h = -(-width // x), -(-height // x)  # libjpeg's decoded size at 1/x
    if x > 1:
        assert min(w, h) >= side and w * h >= area
    if x < 8:  # the next halving would break a bound (with the floors scale() uses)
        w2, h2 = width // (2 * x), height // (2 * x)
        assert min(w2, h2) < side or w2 * h2 < area


@pytest.mark.parametrize("preset", ["standard", "light"])
@pytest.mark.parametrize("size", [(4032, 3024), (3024, 4032), (2000, 600)])
def test_training_decode_never_makes_a_random_crop_smaller_than_its_output(tmp_path, preset, size):
    import torch
    from torchvision.transforms import RandomResizedCrop

    from torchtool.core.train.augment import CROP_RATIO, CROP_SCALE, decode_floor

    crop = 224
    img = load_image(_photo(tmp_path / "p.jpg", size), decode=decode_floor(preset, crop, 256))
    assert img.size != size or preset == "standard" and size == (2000, 600)  # reduced where it may be
    width, height = img.size
    # the bound itself: the shortest side a crop can have at the smallest scale and the extreme ratio
    assert (width * height * CROP_SCALE[preset][0] * CROP_RATIO[0]) ** 0.5 >= crop
    torch.manual_seed(0)
    dummy = torch.empty(3, height, width)
    sides = [min(RandomResizedCrop.get_params(dummy, list(CROP_SCALE[preset]), list(CROP_RATIO))[2:])
             for _ in range(2000)]
    assert min(sides) >= crop


def test_training_without_random_crops_decodes_like_validation():
    from torchtool.core.train.augment import decode_floor

    assert decode_floor("none", 224, 256) == DecodeFloor(256)


def test_crops_are_the_same_size_and_close_to_exact(tmp_path):
    path = _photo(tmp_path / "big.jpg", (4032, 3024))
    crop = CenterCrop(224, 256)
    exact, fast = crop(load_image(path)), crop(load_image(path, decode=DecodeFloor(256)))
    assert exact.shape == fast.shape == (224, 224, 3)
    mse = float(((exact.float() - fast.float()) ** 2).mean())
    assert 10 * np.log10(255 ** 2 / mse) >= 40  # dB


def test_other_formats_decode_in_full(tmp_path):
    path = _photo(tmp_path / "p.png", (1200, 900), fmt="PNG")
    assert load_image(path, decode=DecodeFloor(256)).size == (1200, 900)
    assert np.array_equal(np.asarray(load_image(path, decode=DecodeFloor(256))), np.asarray(load_image(path)))


runner = CliRunner()


def test_extract_features_records_it_and_resume_does_not_mix(tmp_path, photos_dir):
    out = tmp_path / "feats"
    args = ["extract-features", str(photos_dir), "-m", "resnet18", "-w", "none", "--image-size", "64", "-o", str(out),
            "--workers", "0", "--device", "cpu", "-q"]
    first = runner.invoke(app, [*args, "--fast-decode"])
    assert first.exit_code == 0, first.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["fast_decode"] is True and meta["fingerprint"]["fast_decode"] is True
    meta["complete"] = False  # as if it had been interrupted
    (out / "meta.json").write_text(json.dumps(meta))
    mixed = runner.invoke(app, args)  # the same run without --fast-decode may not resume it
    assert mixed.exit_code == 2 and "different settings" in mixed.stderr
    again = runner.invoke(app, [*args, "--fast-decode"])
    assert again.exit_code == 0, again.output


def test_evaluate_reports_it(tmp_path):
    from tests.finetune_data import write_photo_classes

    data = write_photo_classes(tmp_path / "data", size=48)
    result = runner.invoke(app, ["evaluate", "--model", "resnet18", "--weights", "none", "--data", str(data / "val"),
                                 "--workers", "0", "--device", "cpu", "--fast-decode", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"]["fast_decode"] is True


class _Clock:
    """A stand-in for ``time`` in torchtool.core.infer: its clock moves only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def _loader(clock, waits):
    """Batches of two uint8 images; making batch ``b`` takes ``waits[b]`` seconds on ``clock``."""
    import torch

    for b, wait in enumerate(waits):
        clock.now += wait
        yield (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.tensor([2 * b, 2 * b + 1]), ["", ""])


class _Model:
    """A model whose forward takes ``seconds`` on ``clock``."""

    def __init__(self, clock, seconds):
        self.clock, self.seconds = clock, seconds

    def __call__(self, x):
        self.clock.now += self.seconds
        return x


# The first batch waits 16 s (starting workers, a cold cache): the share is of the loop after it.
@pytest.mark.parametrize("load, forward, expected", [(0.75, 0.25, True), (0.125, 0.875, False)])
def test_the_loop_measures_its_waits_and_advises_only_when_loading_limits_it(monkeypatch, load, forward, expected):
    import torch

    from torchtool.core import infer

    clock = _Clock()
    monkeypatch.setattr(infer, "time", clock)
    wait = infer.LoadWait()
    bad = infer.BadInputs([str(i) for i in range(20)], strict=False)
    batches = list(infer.run(_Model(clock, forward), _loader(clock, [16.0] + [load] * 9), torch.device("cpu"),
                             bad=bad, wait=wait))
    assert len(batches) == wait.batches == 10 and wait.samples == 18  # the first batch is kept apart
    assert (wait.first_s, wait.waited_s) == pytest.approx((16.0, 9 * load))
    loop = 10 * forward + 9 * load  # every forward, and the waits after the first batch
    assert (wait.total_s, wait.loop_s) == pytest.approx((16.0 + loop, loop))
    assert wait.fraction == pytest.approx(9 * load / loop)  # not (16 + 9 * load) / (16 + loop): the whole loop's
    advice = infer.loader_advice(wait, workers=0, fast_decode=False, model="resnet18")
    if expected:
        assert advice.startswith("loading was the bottleneck: the model waited for images 73% of the loop "
                                 "(6.8 s of 9.2 s, 1.9 images/s); try --fast-decode")
        assert "torchtool profile resnet18 --dataloader" in advice
        assert "--fast-decode" not in infer.loader_advice(wait, workers=0, fast_decode=True)
    else:
        assert advice is None  # waiting 16 s for the first batch says nothing about the loader's settings
    assert infer.loader_advice(wait, workers=0, fast_decode=False, min_loop_s=10) is None  # too short to matter


def test_extract_features_says_when_loading_was_the_bottleneck(tmp_path, photos_dir, monkeypatch):
    from torchtool.core import infer
    from torchtool.core.data import loading

    # Loading is made slow on the loop's clock, not the machine's: each image takes 0.5 s, the model
    # nothing, whatever else the machine is doing (a busy machine slows the forward, not this clock).
    clock = _Clock()
    monkeypatch.setattr(infer, "time", clock)

    def slow_load(path, max_pixels, decode=None):
        clock.now += 0.5
        return load_image(path, max_pixels, decode)

    monkeypatch.setattr(loading, "load_image", slow_load)
    args = ["extract-features", str(photos_dir), "-m", "resnet18", "-w", "none", "--image-size", "32", "--workers", "0",
            "--batch-size", "2", "--device", "cpu", "--json"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "loading was the bottleneck" in line]
    # 8 photos in 4 batches of 2: the 3 after the first waited 3 s, and the loop took nothing else
    assert lines == [lines[0]] and "waited for images 100% of the loop (3.0 s of 3.0 s, 2.0 images/s)" in lines[0]
    assert "--fast-decode" in lines[0] and "profile resnet18 --dataloader" in lines[0]
    assert json.loads(result.stdout)["rows"] == 8  # stdout stays the summary alone
    quiet = runner.invoke(app, [*args, "-o", str(tmp_path / "quiet"), "-q"])
    assert quiet.exit_code == 0 and "bottleneck" not in quiet.stderr


def test_finetune_decodes_training_and_validation_images_at_their_own_floors(tmp_path, monkeypatch):
    from tests.finetune_data import write_photo_classes
    from torchtool.core.data import loading
    from torchtool.core.models.checkpoint import load_checkpoint
    from torchtool.core.train.augment import decode_floor

    data = write_photo_classes(tmp_path / "data", size=400, per_class=4)
    seen = []

    def spy(path, max_pixels, decode=None):
        img = load_image(path, max_pixels, decode)
        seen.append(("val" if "/val/" in str(path) else "train", decode, img.size))
        return img

    monkeypatch.setattr(loading, "load_image", spy)
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(data), "-o", str(out), "-m", "mobilenet_v3_small", "-w", "none",
                                 "--image-size", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1",
                                 "--device", "cpu", "--fast-decode", "-q"])
    assert result.exit_code == 0, result.output
    train_floor = decode_floor("standard", 32, 37)  # 32 px crops; the resize is 32 x 256/224 = 37 px
    assert {d for split, d, _ in seen if split == "train"} == {train_floor}
    assert {d for split, d, _ in seen if split == "val"} == {DecodeFloor(37)}
    # 400x400 JPEGs: 1/2 keeps every crop at least 32 px for training (1/4 would not), 1/8 covers the 37 px resize
    assert {size for split, _, size in seen if split == "train"} == {(200, 200)}
    assert {size for split, _, size in seen if split == "val"} == {(50, 50)}
    assert load_checkpoint(out / "last.pth")["config"]["fast_decode"] is True
