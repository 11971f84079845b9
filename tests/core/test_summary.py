"""summary's numbers against references: torchinfo's totals, torch's FlopCounterMode on a real forward,
hand-counted parameters and activation bytes, and the shared-parameter rule."""

from __future__ import annotations


import pytest
import torch
import torchinfo
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from torchtool.core.inspect.summary import SummaryConfig, summarize
from torchtool.core.inspect.tracking import LiveBytes

# torchinfo's totals (the figures, and checked live below): params, Mult-Adds at 1x3x224x224
TORCHINFO = {"resnet18": (11_689_512, 1.814e9), "resnet50": (25_557_032, 4.089e9), "vgg16": (138_357_544, 15.48e9),
             "mobilenet_v3_large": (5_483_032, None), "vit_b_16": (86_567_656, None)}


@pytest.mark.parametrize("name", list(TORCHINFO))
def test_totals_and_macs_match_torchinfo(name):
    report = summarize(SummaryConfig(name))
    assert report["measured_on"] == "meta" and report["notes"] == []
    model = torchvision.models.get_model(name, weights=None)
    reference = torchinfo.summary(model, input_size=(1, 3, 224, 224), verbose=0, device="cpu")
    params, macs = TORCHINFO[name]
    assert report["total_params"] == reference.total_params == params
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    assert report["trainable_params"] == params and report["non_trainable_params"] == 0
    assert report["flops"] == 2 * report["macs"]
    assert report["param_bytes"] == 4 * params
    if name != "vit_b_16":  # convolutional nets: torchinfo counts the same multiply-adds, within 1%
        assert report["macs"] == pytest.approx(reference.total_mult_adds, rel=0.01)
    if macs:
        assert report["macs"] == pytest.approx(macs, rel=0.01)


def test_vit_macs_are_half_of_flopcountermode_on_a_real_forward():
    report = summarize(SummaryConfig("vit_b_16"))
    model = torchvision.models.vit_b_16().eval()
    counter = FlopCounterMode(display=False)
    # autograd on (nn.MultiheadAttention's fused inference path hides ops from the counter) and attention
    # by the math kernel (the CPU's flash kernel has no FLOP formula): everything the model computes counts
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 224, 224))
    assert report["macs"] == counter.get_total_flops() // 2 == 17_563_828_224
    reference = torchinfo.summary(model, input_size=(1, 3, 224, 224), verbose=0, device="cpu")
    assert reference.total_mult_adds < report["macs"] / 50  # what torchinfo misses: matmul and attention
    encoder = {row["name"]: row for row in report["layers"]}["encoder"]
    assert encoder["macs"] > 0.99 * report["macs"]  # the attention's MACs are the encoder's


def test_layers_fold_at_depth_and_add_up():
    shallow = summarize(SummaryConfig("resnet18", depth=1))
    assert [r["name"] for r in shallow["layers"]] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                      "layer3", "layer4", "avgpool", "fc"]
    assert sum(r["params"] for r in shallow["layers"]) == shallow["total_params"]
    assert sum(r["macs"] for r in shallow["layers"]) == shallow["macs"]
    rows = {r["name"]: r for r in summarize(SummaryConfig("resnet18", depth=3))["layers"]}
    assert "layer1.0.conv1" in rows and not any(name.count(".") > 2 for name in rows)
    assert rows["layer1.0.conv1"]["output_shape"] == [1, 64, 56, 56] and rows["fc"]["output_shape"] == [1, 1000]
    assert rows["conv1"]["params"] == 64 * 3 * 7 * 7
    assert rows["conv1"]["macs"] == 64 * 112 * 112 * 3 * 7 * 7  # output elements x kernel volume
    assert rows["layer1"]["params"] == sum(rows[f"layer1.{i}"]["params"] for i in (0, 1))
    assert summarize(SummaryConfig("resnet18", depth=0))["layers"] == []


def test_batch_size_and_dtype(tmp_path):
    base = summarize(SummaryConfig("resnet18", input_sizes=["3,64,64"]))
    big = summarize(SummaryConfig("resnet18", input_sizes=["3,64,64"], batch_size=4, dtype="bfloat16"))
    assert big["macs"] == 4 * base["macs"] and big["total_params"] == base["total_params"]
    assert big["param_bytes"] == base["param_bytes"] // 2  # bf16 weights
    assert big["input_bytes"] == 4 * 3 * 64 * 64 * 2
    assert big["layers"][0]["output_shape"] == [4, 64, 32, 32]


class Tied(torch.nn.Module):
    """An embedding whose matrix is also the output layer's (tied weights, as in language models)."""

    def __init__(self, vocab: int = 100, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens))))


def test_a_shared_parameter_is_counted_once():
    report = summarize(SummaryConfig(f"{__name__}:Tied", input_sizes=["12:int64"]))
    per_module = sum(p.numel() for m in Tied().modules() for p in m.parameters(recurse=False))
    assert per_module == 100 * 16 * 2 + 16 * 16 + 16  # what a per-layer sum counts
    assert report["total_params"] == 100 * 16 + 16 * 16 + 16
    assert report["param_bytes"] == 4 * report["total_params"]
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["head"]["params"] == rows["embed"]["params"] == 1600  # each layer still shows its own
    assert rows["head"]["output_shape"] == [1, 12, 100]
    assert report["macs"] == 12 * 16 * 16 + 12 * 16 * 100


def test_kwargs_reach_the_builder():
    report = summarize(SummaryConfig("resnet18", kwargs={"num_classes": 10}, input_sizes=["3,32,32"]))
    assert report["total_params"] == 11_689_512 - 513_000 + 512 * 10 + 10
    assert report["output_shape"] == [1, 10]


def test_live_bytes_follow_what_is_alive():
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10))
    x = torch.randn(4, 1000)
    live = LiveBytes(ignore=[*model.parameters(), x])
    with torch.no_grad(), live:
        model(x)
    # the first Linear's output and ReLU's are alive together; the last output is small
    assert live.peak == 2 * 4 * 1000 * 4
    inplace = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.ReLU(inplace=True))
    live = LiveBytes(ignore=[*inplace.parameters(), x])
    with torch.no_grad(), live:
        inplace(x)
    assert live.peak == 4 * 1000 * 4  # an in-place result is the same memory


def test_forward_backward_memory_holds_gradients_and_saved_activations():
    report = summarize(SummaryConfig(f"{__name__}:mlp", input_sizes=["1000"], batch_size=4))
    assert report["forward_bytes"] == 2 * 4 * 1000 * 4
    # every weight gets a gradient as large as itself (all alive at the end), plus a few activations' worth
    assert report["param_bytes"] < report["forward_backward_bytes"] < report["param_bytes"] + 3 * 4 * 1000 * 4


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10))


class DataDependent(torch.nn.Module):
    """A forward that reads a value (``.item()``): it cannot run on the meta device."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) if x.sum().item() > -1e9 else -self.fc(x)


def test_a_forward_that_needs_data_falls_back_to_the_cpu():
    report = summarize(SummaryConfig(f"{__name__}:DataDependent", input_sizes=["8"]))
    assert report["measured_on"] == "cpu"
    assert report["notes"] and "cannot run on the meta device" in report["notes"][0]
    assert "item()" in report["notes"][0]
    assert report["total_params"] == 36 and report["macs"] == 32 and report["output_shape"] == [1, 4]


def small_transformer():
    layer = torch.nn.TransformerEncoderLayer(32, nhead=4, dim_feedforward=64, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def test_attention_macs_and_a_container_that_is_never_called():
    report = summarize(SummaryConfig(f"{__name__}:small_transformer", input_sizes=["10,32"], depth=2))
    # per layer, 10 tokens of width 32, 4 heads of 8: q/k/v projection, scores, weighted values, output
    # projection, the two feed-forward layers
    per_layer = 10 * 32 * 96 + 4 * 10 * 10 * 8 * 2 + 10 * 32 * 32 + 10 * 32 * 64 * 2
    assert report["macs"] == 2 * per_layer
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["layers"]["type"] == "ModuleList" and rows["layers"]["output_shape"] is None  # iterated, not called
    assert rows["layers"]["macs"] == rows["layers.0"]["macs"] + rows["layers.1"]["macs"] == report["macs"]
