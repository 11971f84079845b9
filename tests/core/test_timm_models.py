"""timm as a model source, piece by piece: names, heads, the squash crop, stage maps (the CLI is in
tests/commands/test_timm.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("timm")

from torchtool.core.data.transforms import CenterCrop  # noqa: E402
from torchtool.core.features.pooling import stage_map  # noqa: E402
from torchtool.core.models.build import build_model  # noqa: E402
from torchtool.core.models.heads import find_head, replace_head  # noqa: E402
from torchtool.core.models.preprocess import Preprocess, preprocess_for  # noqa: E402
from torchtool.core.models.names import list_models  # noqa: E402
from torchtool.core.output import UsageError  # noqa: E402


def test_names_tags_and_listing():
    with pytest.raises(UsageError, match="unknown timm model 'convnext_tny'") as err:
        build_model("timm:convnext_tny", "none", device="meta")
    assert "timm:convnext_tiny" in err.value.hint
    with pytest.raises(UsageError, match="no pretrained tag 'nosuch'") as err:
        build_model("timm:resnet18.nosuch", "none", device="meta")
    assert "a1_in1k" in err.value.hint
    with pytest.raises(UsageError, match="from the name's tag"):
        build_model("timm:resnet18", "IMAGENET1K_V1", device="meta")
    assert "timm:convnext_tiny" in list_models("timm:convnext_t*")
    assert "timm:resnet18.a1_in1k" in list_models("timm:resnet18.*")
    assert list_models("resnet1*") == ["resnet101", "resnet152", "resnet18"]


def test_without_timm_a_timm_name_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were not installed
    with pytest.raises(UsageError, match="timm: models need timm") as err:
        build_model("timm:resnet18", "none", device="meta")
    assert "pip install 'torchtool[timm]'" in err.value.hint


def test_the_head_is_timms_classifier_and_reset_keeps_the_pooling():
    built = build_model("timm:convnext_tiny", "none", num_classes=7, device="meta")
    assert built.head == "head.fc" and built.num_classes == 7
    model = built.model
    assert find_head(model)[0] == "head.fc" and model.num_classes == 7
    assert type(model.head.norm).__name__ != "Identity"  # reset_classifier replaced the fc only
    headless = build_model("timm:eva02_tiny_patch14_224.mim_in22k", "none", device="meta")
    assert headless.num_classes == 0 and headless.head == "head"  # no classifier: not its MLP's last Linear
    replace_head(headless.model, 3)
    assert headless.model.head.out_features == 3


def test_the_preprocessing_is_timms_data_config():
    import timm

    pre = preprocess_for("timm:vit_small_patch16_224.augreg_in21k")
    data = timm.data.resolve_data_config({}, model=timm.create_model("vit_small_patch16_224.augreg_in21k",
                                                                      pretrained=False))
    assert (pre.crop_size, pre.interpolation, pre.mean, pre.std) == (224, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert pre.resize_size == int(224 / data["crop_pct"])
    squash = next(n for n in timm.list_pretrained("*") if timm.models.get_pretrained_cfg(n).crop_mode == "squash")
    assert preprocess_for(f"timm:{squash}").crop_mode == "squash"
    again = Preprocess.from_dict(preprocess_for(f"timm:{squash}").to_dict())
    assert again.crop_mode == "squash"
    assert "crop_mode" not in Preprocess().to_dict()  # a center crop's record is what it always was


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64)])
def test_the_squash_crop_equals_timms_eval_transform(size):
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = CenterCrop(96, 106, "bicubic", squash=True)(image)
    theirs = create_transform(input_size=(3, 96, 96), crop_pct=96 / 106.5, crop_mode="squash",
                              interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert tuple(ours.shape) == (96, 96, 3)
    np.testing.assert_allclose(ours.permute(2, 0, 1).float().numpy() / 255, theirs.numpy(), atol=1e-6)


def test_stage_maps_are_forward_intermediates_layouts():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # a class token + 2x2 patches, 3 channels
    grid = stage_map(tokens, channels=3, prefix_tokens=1)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2])  # patch (row 0, column 1) is the third token
    nhwc = torch.randn(2, 4, 5, 8)
    assert torch.equal(stage_map(nhwc, channels=8), nhwc.permute(0, 3, 1, 2))
    nchw = torch.randn(2, 8, 4, 4)
    assert stage_map(nchw, channels=8) is nchw


def test_a_vit_takes_only_its_own_input_size():
    built = build_model("timm:vit_small_patch16_224", "none", device="meta")
    assert built.preprocessing().crop_size == 224
    with pytest.raises(UsageError, match="takes 224x224 inputs only"):
        built.preprocessing(64)
    assert build_model("timm:resnet18", "none", device="meta").preprocessing(64).crop_size == 64  # a CNN takes any
