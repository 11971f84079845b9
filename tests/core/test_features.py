"""Pooling, layer names and aliases, and the one-pass FeatureExtractor against torchvision."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

from torchtool.core.data import images, transforms  # noqa: E402
from torchtool.core.features import FeatureExtractor, LayerCatalog, bilinear_pool, l2_normalize, pool_features  # noqa: E402
from torchtool.core.features.layers import vgg_aliases  # noqa: E402
from torchtool.core.models import Preprocess  # noqa: E402
from torchtool.core.output import EXIT_USAGE, UsageError  # noqa: E402


def reference_bilinear(x: np.ndarray) -> np.ndarray:
    """Bilinear pooling written out in float64: X·Xᵀ/(H·W), signed sqrt, L2 norm, flattened."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1).astype(np.float64)
    gram = np.einsum("ncp,ndp->ncd", flat, flat) / flat.shape[-1]
    gram = np.sign(gram) * np.sqrt(np.abs(gram))
    vec = gram.reshape(n, -1)
    return vec / np.linalg.norm(vec, axis=1, keepdims=True)


def photo_batch(paths, crop: int = 64, resize: int = 72) -> torch.Tensor:
    """Real photos through torchtool's loader and the evaluation transform."""
    transform = transforms.preprocess_transform(Preprocess(crop, resize))
    return torch.stack([transform(images.load_image(p)) for p in paths])


def without_inplace(model: nn.Module) -> nn.Module:
    """A copy whose in-place activations do not overwrite the layers before them (for references)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def random_model(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None, **kwargs).eval()


def meta_model(arch: str) -> nn.Module:
    with torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None).eval()


# --- pooling -------------------------------------------------------------------------


def test_bilinear_pool_matches_reference_and_is_symmetric_and_unit_norm():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 4)  # negative values too: the signed sqrt matters
    out = bilinear_pool(x)
    assert out.shape == (3, 36)
    np.testing.assert_allclose(out.numpy(), reference_bilinear(x.numpy()), rtol=1e-5, atol=1e-6)
    mats = out.view(3, 6, 6)
    torch.testing.assert_close(mats, mats.transpose(1, 2))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert (mats.diagonal(dim1=1, dim2=2) > 0).all()  # x_c·x_c > 0: the sqrt of a positive mean


def test_bilinear_pool_of_a_vector_is_its_normalised_outer_product():
    x = torch.tensor([[1.0, -2.0, 2.0]])
    outer = torch.outer(x[0], x[0])
    expected = (outer.sign() * outer.abs().sqrt()).flatten()
    torch.testing.assert_close(bilinear_pool(x)[0], expected / expected.norm())


@pytest.mark.parametrize(
    ("how", "reduce"), [("avg", lambda t: t.mean(dim=(2, 3))), ("max", lambda t: t.amax(dim=(2, 3)))]
)
def test_avg_and_max_pool_every_spatial_position(how, reduce):
    torch.manual_seed(1)
    x = torch.randn(2, 7, 3, 5)
    out = pool_features(x, how)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, reduce(x))


def test_pool_none_keeps_the_map_and_vectors_pass_through():
    x = torch.randn(2, 4, 3, 3)
    assert pool_features(x, "none") is x
    v = torch.randn(2, 10)
    torch.testing.assert_close(pool_features(v, "avg"), v)
    torch.testing.assert_close(pool_features(v, "max"), v)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_features(x, "median")


def test_l2_normalize_gives_unit_rows_in_the_same_direction():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 2, 2) * 10
    out = l2_normalize(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.ones(4))
    torch.testing.assert_close(out.flatten(1), x.flatten(1) / x.flatten(1).norm(dim=1, keepdim=True))


# --- layer names ---------------------------------------------------------------------


def test_vgg16_aliases_point_at_the_right_modules():
    aliases = vgg_aliases(meta_model("vgg16"))
    expected = {"conv1_1": "features.0", "relu1_1": "features.1", "pool1": "features.4", "conv5_3": "features.28",
                "relu5_3": "features.29", "pool5": "features.30", "fc6": "classifier.0", "relu6": "classifier.1",
                "fc7": "classifier.3", "relu7": "classifier.4", "fc8": "classifier.6"}
    assert {k: aliases[k] for k in expected} == expected
    assert sum(k.startswith("conv") for k in aliases) == 13


def test_vgg16_bn_has_bn_aliases():
    aliases = vgg_aliases(meta_model("vgg16_bn"))
    assert aliases["conv1_1"] == "features.0"
    assert aliases["bn1_1"] == "features.1"
    assert aliases["relu1_1"] == "features.2"
    assert aliases["relu5_3"] == "features.42"


def test_alias_shapes_at_224():
    vgg = {r["name"]: r for r in LayerCatalog(meta_model("vgg16"), "vgg16").table(224)}
    assert vgg["relu5_3"]["shape"] == [512, 14, 14]
    assert vgg["pool5"]["shape"] == [512, 7, 7]
    assert vgg["fc7"]["shape"] == [4096]
    assert vgg["conv1_1"]["shape"] == [64, 224, 224]
    assert vgg["logits"]["shape"] == [1000]
    r18 = {r["name"]: r for r in LayerCatalog(meta_model("resnet18"), "resnet18").table(224)}
    assert r18["gap"]["shape"] == [512]
    assert r18["layer3"]["shape"] == [256, 14, 14]
    assert r18["layer4"]["shape"] == [512, 7, 7]
    r50 = {r["name"]: r for r in LayerCatalog(meta_model("resnet50"), "resnet50").table(224)}
    assert r50["gap"]["shape"] == [2048]
    assert r50["layer4"]["shape"] == [2048, 7, 7]


def test_table_lists_friendly_names_first():
    rows = LayerCatalog(meta_model("resnet18"), "resnet18").table(64)
    kinds = [r["kind"] for r in rows]
    n_alias = kinds.count("alias")
    assert [r["name"] for r in rows[:n_alias]] == ["gap", "layer1", "layer2", "layer3", "layer4", "logits"]
    assert set(kinds[n_alias:]) == {"node"}
    by_name = {r["name"]: r["shape"] for r in rows}
    assert by_name["layer3"] == [256, 4, 4]  # shapes follow the image size
    assert by_name["conv1"] == [64, 32, 32]


def test_unknown_layer_is_a_usage_error_with_close_names():
    catalog = LayerCatalog(meta_model("resnet18"), "resnet18")
    with pytest.raises(UsageError) as err:
        catalog.resolve("layr3", "none")
    assert err.value.exit_code == EXIT_USAGE
    assert "layr3" in err.value.message
    suggested = err.value.hint.removeprefix("did you mean ").rstrip("?").split(", ")
    assert suggested[0] == "layer3"
    assert len(suggested) == len(set(suggested)), f"suggestions repeat a name: {err.value.hint}"


def test_resolve_pools_and_names():
    catalog = LayerCatalog(meta_model("resnet18"), "resnet18")
    gap = catalog.resolve("gap", "none")
    assert (gap.target, gap.pool) == ("avgpool", "avg")
    assert catalog.resolve("layer3:bilinear", "none").pool == "bilinear"
    assert catalog.resolve("layer3", "max").pool == "max"
    assert catalog.resolve("layer3", "none", {"layer3": "avg"}).pool == "avg"
    assert catalog.resolve("logits", "none").target == "fc"
    assert catalog.resolve("layer2.1.bn2", "none").target == "layer2.1.bn2"  # an FX node name
    with pytest.raises(UsageError, match="unknown pooling"):
        catalog.resolve("layer3:median", "none")


# --- the extractor: values ---------------------------------------------------------------


def test_python_api_returns_a_dict_of_tensors(photo_files):
    model = random_model("resnet18")
    extractor = FeatureExtractor(model, ["layer3", "gap"], arch="resnet18").eval()
    x = photo_batch(photo_files[:3])
    with torch.no_grad():
        feats = extractor(x)
        layer4 = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(
            model.conv1(x))))))))
    assert list(feats) == ["layer3", "gap"]
    assert all(isinstance(v, torch.Tensor) for v in feats.values())
    assert feats["layer3"].shape == (3, 256, 4, 4)
    assert feats["gap"].shape == (3, 512)
    torch.testing.assert_close(feats["gap"], layer4.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logits = FeatureExtractor(model, ["logits"], arch="resnet18")(x)["logits"]
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)


PARITY = [
    ("resnet18", ["bn1", "layer1", "layer3", "gap", "logits"], {"gap": "avgpool", "logits": "fc"}),
    ("mobilenet_v3_small", ["features.3", "classifier.0", "gap", "logits"],
     {"gap": "avgpool", "logits": "classifier.3"}),
    ("squeezenet1_0", ["features.12", "gap", "logits"], {"gap": "classifier.0", "logits": "flatten"}),
]


@pytest.mark.parametrize(("arch", "layers", "nodes"), PARITY, ids=[p[0] for p in PARITY])
def test_extractor_matches_create_feature_extractor(photo_files, arch, layers, nodes):
    model = random_model(arch, seed=3)
    x = photo_batch(photo_files[:4])
    extractor = FeatureExtractor(model, layers, arch=arch)
    reference = create_feature_extractor(without_inplace(model), {nodes.get(n, n): n for n in layers})
    with torch.no_grad():
        got, want = extractor(x), reference(x)
    assert list(got) == layers
    for name in layers:
        expected = want[name].mean(dim=(2, 3)) if name == "gap" else want[name]
        assert got[name].shape == expected.shape, name
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-4, msg=f"{arch} {name}")


def _trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so folding them is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


def test_folded_batchnorm_gives_the_same_features_and_leaves_the_model_alone(photo_files):
    model = _trained_looking(random_model("resnet18"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = photo_batch(photo_files[:3])
    layers = ["conv1", "bn1", "layer2", "gap", "logits"]  # conv1 is asked for: it keeps its own BatchNorm
    with torch.no_grad():
        plain = FeatureExtractor(model, layers, arch="resnet18")
        folded = FeatureExtractor(model, layers, arch="resnet18", fold_bn=True)
        want, got = plain(x), folded(x)
        model_out = model(x)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
    kinds = [type(folded.body.get_submodule(n.target)).__name__ for n in folded.body.graph.nodes if n.op == "call_module"]
    assert kinds.count("BatchNorm2d") == 1  # only bn1, whose conv's output is requested; 19 others folded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model_out)


def test_layer_before_an_inplace_relu_is_not_overwritten(photo_files):
    model = random_model("resnet18")
    x = photo_batch(photo_files[:2])
    with torch.no_grad():
        bn1 = FeatureExtractor(model, ["bn1", "relu"], arch="resnet18")(x)
        direct = model.bn1(model.conv1(x))
    assert (bn1["bn1"] < 0).any(), "bn1 was overwritten by the in-place ReLU after it"
    torch.testing.assert_close(bn1["bn1"], direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn1["relu"], direct.clamp(min=0), rtol=1e-4, atol=1e-5)


def test_vgg16_real_forward_at_224(photo_files):
    model = random_model("vgg16")
    x = photo_batch(photo_files[:1], crop=224, resize=256)
    names = ["conv5_3", "relu5_3", "pool5", "fc7", "relu7"]
    with torch.no_grad():
        feats = FeatureExtractor(model, names, arch="vgg16")(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "conv5_3": (1, 512, 14, 14), "relu5_3": (1, 512, 14, 14), "pool5": (1, 512, 7, 7),
        "fc7": (1, 4096), "relu7": (1, 4096)}
    assert (feats["conv5_3"] < 0).any() and (feats["fc7"] < 0).any()  # pre-activation values kept
    torch.testing.assert_close(feats["relu5_3"], feats["conv5_3"].clamp(min=0))
    torch.testing.assert_close(feats["pool5"], F.max_pool2d(feats["relu5_3"], 2))
    torch.testing.assert_close(feats["relu7"], feats["fc7"].clamp(min=0))


def test_pools_and_normalize_in_the_extractor(photo_files):
    model = random_model("resnet18")
    x = photo_batch(photo_files[:3])
    with torch.no_grad():
        plain = FeatureExtractor(model, ["layer4"], arch="resnet18")(x)["layer4"]
        pooled = FeatureExtractor(model, {"bil": "layer4", "mx": "layer4", "av": "layer4"},
                                  pools={"bil": "bilinear", "mx": "max", "av": "avg"})(x)
        normed = FeatureExtractor(model, ["layer4", "gap"], arch="resnet18", normalize=True)(x)
    np.testing.assert_allclose(pooled["bil"].numpy(), reference_bilinear(plain.numpy()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled["mx"], plain.amax(dim=(2, 3)))
    torch.testing.assert_close(pooled["av"], plain.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    for name in ("layer4", "gap"):
        torch.testing.assert_close(normed[name].flatten(1).norm(dim=1), torch.ones(3))
    torch.testing.assert_close(normed["layer4"], plain / plain.flatten(1).norm(dim=1).view(3, 1, 1, 1),
                               rtol=1e-4, atol=1e-6)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so forward hooks are used."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > float("-inf"):  # a Python branch on a tensor value
            y = self.act(y)
        return self.head(y.mean(dim=(2, 3)))


class PerSample(nn.Module):
    """A Python loop over the batch: torch.fx cannot trace it, the meta device runs it; one module is never run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Linear(4, 4)  # as a block's drop-path that is off
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.cat([self.conv(x[i:i + 1]) for i in range(x.shape[0])])
        return self.head(y.mean(dim=(2, 3)))


def test_an_untraceable_models_layer_list_leaves_out_modules_its_forward_never_runs():
    catalog = LayerCatalog(PerSample().eval(), "per-sample")
    assert catalog.nodes is None  # hooks
    rows = {row["name"]: row for row in catalog.table(8)}
    assert "unused" not in rows
    assert rows["conv"] == {"name": "conv", "target": "conv", "kind": "module", "shape": [4, 8, 8]}
    assert rows["head"]["shape"] == [2] and rows["logits"]["shape"] == [2]


def test_untraceable_model_falls_back_to_hooks():
    torch.manual_seed(4)
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    extractor = FeatureExtractor(model, {"conv": "conv", "act": "act", "head": "head"}, pools={"act": "avg"})
    assert extractor.mode == "hooks"
    with torch.no_grad():
        feats = extractor(x)
        conv = model.conv(x)
    assert (feats["conv"] < 0).any(), "the conv output was overwritten by the in-place ReLU"
    torch.testing.assert_close(feats["conv"], conv)
    torch.testing.assert_close(feats["act"], conv.clamp(min=0).mean(dim=(2, 3)))
    torch.testing.assert_close(feats["head"], model(x))
