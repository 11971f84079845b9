"""--fast-decode: JPEGs decoded at a reduced DCT scale that still covers the resize, close to the exact path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from torchtool.cli import app
from torchtool.core.data.images import load_image
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
    img = load_image(_photo(tmp_path / "p.jpg", size), decode_at_least=256)
    assert img.size == expected
    assert min(img.size) >= min(256, min(size))  # never below the resize target (or the photo itself)
    if img.size != size:
        assert min(img.size) // 2 < 256 or min(size) // min(img.size) == 8  # one more halving would be too small


def test_crops_are_the_same_size_and_close_to_exact(tmp_path):
    path = _photo(tmp_path / "big.jpg", (4032, 3024))
    crop = CenterCrop(224, 256)
    exact, fast = crop(load_image(path)), crop(load_image(path, decode_at_least=256))
    assert exact.shape == fast.shape == (224, 224, 3)
    mse = float(((exact.float() - fast.float()) ** 2).mean())
    assert 10 * np.log10(255 ** 2 / mse) >= 40  # dB


def test_other_formats_decode_in_full(tmp_path):
    path = _photo(tmp_path / "p.png", (1200, 900), fmt="PNG")
    assert load_image(path, decode_at_least=256).size == (1200, 900)
    assert np.array_equal(np.asarray(load_image(path, decode_at_least=256)), np.asarray(load_image(path)))


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
