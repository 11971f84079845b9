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


def _loader(batches, delay):
    """A loader of uint8 batches that takes ``delay`` seconds to make each one."""
    import time

    import torch

    for b in range(batches):
        time.sleep(delay)
        yield (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.tensor([2 * b, 2 * b + 1]), ["", ""])


class _Slow:
    def __init__(self, delay):
        self.delay = delay

    def __call__(self, x):
        import time

        time.sleep(self.delay)
        return x


@pytest.mark.parametrize("load, forward, expected", [(0.06, 0.0, True), (0.0, 0.06, False)])
def test_the_loop_measures_its_waits_and_advises_only_when_loading_limits_it(load, forward, expected):
    import torch

    from torchtool.core import infer

    wait = infer.LoadWait()
    bad = infer.BadInputs([str(i) for i in range(20)], strict=False)
    batches = list(infer.run(_Slow(forward), _loader(10, load), torch.device("cpu"), bad=bad, wait=wait))
    assert len(batches) == wait.batches == 10 and wait.samples == 18  # the first batch is kept apart
    assert wait.loop_s >= 9 * max(load, forward)
    advice = infer.loader_advice(wait, workers=0, fast_decode=False, model="resnet18", min_loop_s=0.3)
    if expected:
        assert wait.fraction > 0.8
        assert advice.startswith("loading was the bottleneck: the model waited for images")
        assert "--fast-decode" in advice and "torchtool profile resnet18 --dataloader" in advice
        assert "--fast-decode" not in infer.loader_advice(wait, workers=0, fast_decode=True, min_loop_s=0.3)
    else:
        assert wait.fraction < 0.2 and advice is None
    assert infer.loader_advice(wait, workers=0, fast_decode=False) is None  # under a second: not worth a line


def test_extract_features_says_when_loading_was_the_bottleneck(tmp_path):
    import shutil

    photo = _photo(tmp_path / "photo.jpg", (1600, 1200))
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(80):
        shutil.copy(photo, folder / f"{k:02d}.jpg")
    # a 32-px forward costs next to nothing; decoding 2-megapixel JPEGs in the main process does not
    result = runner.invoke(app, ["extract-features", str(folder), "-m", "resnet18", "-w", "none", "--image-size", "32",
                                 "--resize", "32", "--workers", "0", "--batch-size", "2", "--device", "cpu",
                                 "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "loading was the bottleneck" in line]
    assert len(lines) == 1 and "--fast-decode" in lines[0] and "profile resnet18 --dataloader" in lines[0]
    json.loads(result.stdout)  # stdout stays the summary alone


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
