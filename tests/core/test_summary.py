"""summary's numbers against references: torchinfo's totals, torch's FlopCounterMode on a real forward,
hand-counted parameters and activation bytes, and the shared-parameter rule."""

from __future__ import annotations


import pytest
import torch
import torchinfo
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from torchtool.core.inspect.summary import SummaryConfig, summarize, totals
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


class Recurrent(torch.nn.Module):
    """A 2-layer LSTM (16 -> 32) and a head; ``item`` makes the forward read a value, as a data-dependent one does."""

    def __init__(self, item: bool = True):
        super().__init__()
        self.lstm = torch.nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.fc = torch.nn.Linear(32, 4)
        self.item = item

    def forward(self, x):
        out, _ = self.lstm(x)
        if self.item and x.sum().item() < -1e9:
            out = -out
        return self.fc(out[:, -1])


def recurrent_on_meta():
    return Recurrent(item=False)


# by hand, 10 steps: 4 gates x hidden x (input + hidden) per step and layer, then the head
LSTM_MACS = 10 * 4 * 32 * (16 + 32) + 10 * 4 * 32 * (32 + 32) + 32 * 4


@pytest.mark.parametrize("factory, device", [("recurrent_on_meta", "meta"), ("Recurrent", "cpu")])
def test_lstm_macs_by_hand_on_meta_and_on_the_cpu_fallback(factory, device):
    report = summarize(SummaryConfig(f"{__name__}:{factory}", input_sizes=["10,16"]))
    assert report["measured_on"] == device
    assert report["macs"] == LSTM_MACS and report["uncounted_ops"] == []  # oneDNN's fused LSTM hid all but the head


class ItemTransformer(torch.nn.Module):
    """small_transformer's encoder with a forward that reads a value: summarised by a real forward on the CPU."""

    def __init__(self):
        super().__init__()
        self.encoder = small_transformer()

    def forward(self, x):
        return self.encoder(x) if x.sum().item() > -1e9 else x


def test_attention_macs_by_hand_on_the_cpu_fallback():
    report = summarize(SummaryConfig(f"{__name__}:ItemTransformer", input_sizes=["10,32"]))
    per_layer = 10 * 32 * 96 + 4 * 10 * 10 * 8 * 2 + 10 * 32 * 32 + 10 * 32 * 64 * 2  # as on the meta device
    assert report["measured_on"] == "cpu" and report["macs"] == 2 * per_layer and report["uncounted_ops"] == []


class Spectrum(torch.nn.Module):
    """A linear layer, then an FFT: an operator FlopCounterMode has no formula for."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.fft.rfft(self.fc(x)).abs()


def test_an_operator_without_a_flop_formula_is_listed_not_hidden():
    report = summarize(SummaryConfig(f"{__name__}:Spectrum", input_sizes=["16"]))
    assert report["macs"] == 16 * 16 and report["uncounted_ops"] == [{"op": "aten._fft_r2c", "calls": 1}]
    assert any("aten._fft_r2c" in note and "unknown" in note for note in report["notes"])
    assert "aten._fft_r2c (1 call)" in totals(report)["not counted"]


def drop_path_net(depth: int = 4, width: int = 32):
    """timm's pattern: the constructor reads its drop-path rates from a tensor (``.item()``)."""
    rates = [x.item() for x in torch.linspace(0, 0.1, depth)]
    assert rates[-1] == pytest.approx(0.1)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in rates])


def test_a_constructor_that_reads_its_own_tensors_is_built_on_meta():
    report = summarize(SummaryConfig(f"{__name__}:drop_path_net", input_sizes=["32"]))
    assert report["measured_on"] == "meta" and report["notes"] == []
    assert report["total_params"] == 4 * (32 * 32 + 32) and report["macs"] == 4 * 32 * 32


BUILT = []


def reads_its_weights():
    """A constructor that needs real weights (it reads one): it cannot be built on the meta device."""
    layer = torch.nn.Linear(1000, 1000)
    scale = layer.weight.abs().max().item()
    BUILT.append(scale)
    return torch.nn.Sequential(layer)


def test_a_real_build_stops_at_half_the_free_memory(monkeypatch):
    from torchtool.core.output import Failure

    monkeypatch.setattr("torchtool.core.inspect.bounds.available_memory", lambda: 2 << 20)  # 2 MiB free
    BUILT.clear()
    with pytest.raises(Failure, match=r"cannot run on the meta device .*weights \(more than 1\.0 MB\) are too "
                                      r"large for a real forward here \(2\.1 MB free\)"):
        summarize(SummaryConfig(f"{__name__}:reads_its_weights", input_sizes=["1000"]))
    assert BUILT == []  # stopped at the 4 MB weight, before the constructor went on
    monkeypatch.setattr("torchtool.core.inspect.bounds.available_memory", lambda: 1 << 30)
    report = summarize(SummaryConfig(f"{__name__}:reads_its_weights", input_sizes=["1000"]))
    assert report["measured_on"] == "cpu" and report["total_params"] == 1000 * 1000 + 1000 and len(BUILT) == 1


def test_batchnorm_at_batch_1_is_trained_at_2_and_said_so():
    one = summarize(SummaryConfig("resnet18", input_sizes=["3,32,32"]))
    two = summarize(SummaryConfig("resnet18", input_sizes=["3,32,32"], batch_size=2))
    assert one["forward_backward_bytes"] == two["forward_backward_bytes"] and one["forward_backward_batch_size"] == 2
    assert two["forward_backward_batch_size"] == 2 and not two["notes"]
    assert one["notes"] == ["forward+backward memory is for a batch of 2: at 1, ValueError: Expected more than 1 "
                            "value per channel when training, got input size torch.Size([1, 512, 1, 1])"]
    assert "at batch 2" in totals(one)["forward+backward"] and "at batch" not in totals(two)["forward+backward"]
