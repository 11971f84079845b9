"""Multi-layer feature extraction from one forward pass, layer names and pooling.

    >>> from torchtool.core.features import FeatureExtractor
    >>> extractor = FeatureExtractor(model, ["layer3", "gap"], arch="resnet18").eval()
    >>> feats = extractor(batch)            # {"layer3": (N,256,14,14), "gap": (N,512)}

Layer names are friendly aliases (``relu5_3``, ``fc7``, ``gap``, ``logits``...), torchvision
FX node names (``get_graph_node_names``) or module names (``named_modules``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchtool.core.models import find_head, suggest
from torchtool.core.output import UsageError

POOLS = ("none", "avg", "max", "bilinear")


# --- pooling -----------------------------------------------------------------


def bilinear_pool(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Bilinear pooling: X·Xᵀ/(H·W) over positions, signed sqrt, L2-normalised, flattened.

    (N, C, H, W) -> (N, C*C). A 2-D (N, C) input is treated as one position.
    """
    x = x.float()
    x = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)
    gram = torch.bmm(x, x.transpose(1, 2)) / x.shape[-1]
    gram = gram.sign() * gram.abs().sqrt()
    return F.normalize(gram.flatten(1), dim=1, eps=eps)


def pool_features(x: torch.Tensor, how: str) -> torch.Tensor:
    """``none`` keeps the map; ``avg``/``max`` pool every spatial position (GAP/GMP); ``bilinear``."""
    if how == "none":
        return x
    if how == "bilinear":
        return bilinear_pool(x)
    if x.dim() <= 2:
        return x
    flat = x.flatten(2)
    if how == "avg":
        return flat.mean(-1)
    if how == "max":
        return flat.amax(-1)
    raise ValueError(f"unknown pooling {how!r}; choose from {POOLS}")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale every sample's flattened vector to unit L2 norm (shape kept)."""
    return F.normalize(x.flatten(1).float(), dim=1).view(x.shape)


# --- layer names -------------------------------------------------------------


def vgg_aliases(model: nn.Module) -> dict[str, str]:
    """conv{b}_{i}, bn{b}_{i}, relu{b}_{i}, pool{b}, fc6-8 and relu6/7 for a torchvision VGG."""
    aliases: dict[str, str] = {}
    block, conv = 1, 0
    for name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            conv += 1
            aliases[f"conv{block}_{conv}"] = f"features.{name}"
        elif isinstance(module, nn.BatchNorm2d):
            aliases[f"bn{block}_{conv}"] = f"features.{name}"
        elif isinstance(module, nn.ReLU):
            aliases[f"relu{block}_{conv}"] = f"features.{name}"
        elif isinstance(module, nn.MaxPool2d):
            aliases[f"pool{block}"] = f"features.{name}"
            block, conv = block + 1, 0
    fc = 6
    for name, module in model.classifier.named_children():
        if isinstance(module, nn.Linear):
            aliases[f"fc{fc}"] = f"classifier.{name}"
            fc += 1
        elif isinstance(module, nn.ReLU):
            aliases[f"relu{fc - 1}"] = f"classifier.{name}"
    return aliases


@dataclass
class Layer:
    """A requested layer: the name it is saved under, where it is read, how it is pooled."""

    name: str
    target: str
    pool: str


def _traced_nodes(model: nn.Module) -> list[str] | None:
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        return get_graph_node_names(model)[1]
    except Exception:  # not FX-traceable: hooks are used instead
        return None


def _meta_clone(model: nn.Module, arch: str) -> nn.Module:
    """The same network on the meta device (no memory), rebuilt by name when possible."""
    if next(model.parameters()).device.type == "meta":
        return model
    try:
        from torchvision.models import get_model

        from torchtool.core.models import build_kwargs, num_outputs, replace_head

        with torch.device("meta"):
            clone = get_model(arch, weights=None, **build_kwargs(arch, pretrained=False))
            replace_head(clone, num_outputs(find_head(model)[1]))
        if [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]:
            return clone.eval()
    except Exception:  # some builders compute with tensors (regnet): copy instead
        pass
    return copy.deepcopy(model).to("meta").eval()


def _node_shapes(model: nn.Module, nodes: Sequence[str], image_size: int, arch: str = "") -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every node, computed on the meta device (no real compute)."""
    meta = _meta_clone(model, arch)
    extractor = FeatureExtractor(meta, {n: n for n in nodes}, pools={})
    with torch.no_grad():
        out = extractor(torch.empty(1, 3, image_size, image_size, device="meta"))
    return {k: tuple(v.shape[1:]) for k, v in out.items() if isinstance(v, torch.Tensor)}


class LayerCatalog:
    """The layer names a model offers: aliases, FX nodes and modules."""

    def __init__(self, model: nn.Module, arch: str = ""):
        self.model = model
        self.arch = arch
        self.nodes = _traced_nodes(model)
        self.modules = [n for n, _ in model.named_modules() if n]
        self.aliases: dict[str, str] = {}
        if arch.startswith("vgg") and hasattr(model, "features"):
            self.aliases.update(vgg_aliases(model))
        for i in range(1, 5):
            if hasattr(model, f"layer{i}"):
                self.aliases[f"layer{i}"] = f"layer{i}"
        self.aliases["logits"] = self.nodes[-1] if self.nodes else find_head(model)[0]
        self._gap: str | None = None

    def gap_target(self, image_size: int = 224) -> str | None:
        """The last 4-D feature map before the classifier head (GAP of it is the pooled vector)."""
        if self._gap is None and self.nodes and not self.arch.startswith("vit"):
            head, _ = find_head(self.model)
            first_head = next((i for i, n in enumerate(self.nodes) if n == head or n.startswith(head + ".")),
                              len(self.nodes))
            shapes = _node_shapes(self.model, self.nodes[:first_head], image_size, self.arch)
            maps = [n for n in self.nodes[:first_head] if len(shapes.get(n, ())) == 3]
            self._gap = maps[-1] if maps else ""
        return self._gap or None

    def names(self) -> list[str]:
        # an alias, node and module may share a name (layer3): list each once
        return list(dict.fromkeys(list(self.aliases) + ["gap"] + (self.nodes or []) + self.modules))

    def resolve(self, spec: str, default_pool: str, pools: Mapping[str, str] | None = None) -> Layer:
        """``name`` or ``name:pool`` -> Layer; unknown names fail with the closest suggestions."""
        name, _, pool = spec.partition(":")
        pool = pool or (pools or {}).get(name) or ""
        if pool and pool not in POOLS:
            raise UsageError(f"unknown pooling {pool!r} for layer {name!r}", hint=f"choose from: {', '.join(POOLS)}")
        if name == "gap":
            target = self.gap_target()
            if target is None:
                raise UsageError(f"{self.arch or 'this model'} has no pooled feature map for 'gap'",
                                 hint="pass a node name and --pool avg instead")
            return Layer(name, target, pool or "avg")
        target = self.aliases.get(name) or (name if name in (self.nodes or []) or name in self.modules else None)
        if not target:
            hint = suggest(name, self.names(), n=5) or "run with --list-layers to see the names"
            raise UsageError(f"unknown layer {name!r} for {self.arch or 'this model'}", hint=hint)
        return Layer(name, target, pool or default_pool)

    def table(self, image_size: int) -> list[dict[str, Any]]:
        """Every name with its per-sample output shape at ``image_size``: aliases first."""
        rows: list[dict[str, Any]] = []
        nodes = self.nodes or self.modules
        targets = dict(self.aliases)
        gap = self.gap_target(image_size)
        shapes = _node_shapes(self.model, list(dict.fromkeys(list(targets.values()) + nodes)), image_size, self.arch)
        if gap:
            rows.append({"name": "gap", "target": gap, "kind": "alias", "shape": [shapes[gap][0]]})
        for alias, target in targets.items():
            rows.append({"name": alias, "target": target, "kind": "alias", "shape": list(shapes.get(target, ()))})
        kind = "node" if self.nodes else "module"
        rows.extend({"name": n, "target": n, "kind": kind, "shape": list(shapes.get(n, ()))} for n in nodes)
        return rows


# --- the extractor -----------------------------------------------------------


def _protect_outputs(body: Any) -> None:
    """Make the in-place ops that consume a returned node out-of-place, and only those.

    An in-place ReLU right after a requested conv would overwrite the conv's saved output;
    every other in-place op stays in place (disabling them all costs ~25% speed on CPU).
    """
    output = next(n for n in body.graph.nodes if n.op == "output")
    for node in output.all_input_nodes:
        for user in node.users:
            if user.op == "call_module" and getattr(body.get_submodule(user.target), "inplace", None) is True:
                body.get_submodule(user.target).inplace = False
            elif user.kwargs.get("inplace") is True:  # F.relu(x, inplace=True) in forward()
                user.kwargs = {**user.kwargs, "inplace": False}
    body.recompile()


class FeatureExtractor(nn.Module):
    """An nn.Module returning ``{name: features}`` for many layers from ONE forward pass.

    ``layers`` is a list of names or a ``{name: target}`` mapping (target: FX node or module
    name). torchvision's ``create_feature_extractor`` is used where the model traces; else
    forward hooks that clone outputs. ``pools`` maps names to a pooling in :data:`POOLS`;
    ``nodes`` (the model's FX node names, when already known) saves a trace. ``fold_bn``
    folds each eval-mode BatchNorm into the convolution before it (unless that convolution's
    own output is requested): the same features up to float rounding, ~15% faster, but the
    extractor is then for inference only. The model keeps its own convolutions and BatchNorm.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | Mapping[str, str] | Sequence[Layer],
                 pools: Mapping[str, str] | None = None, normalize: bool = False, arch: str = "",
                 nodes: Sequence[str] | None = None, fold_bn: bool = False):
        super().__init__()
        if layers and isinstance(layers, Sequence) and isinstance(layers[0], str):
            catalog = LayerCatalog(model, arch)
            layers = [catalog.resolve(n, "none") for n in layers]
        if isinstance(layers, Mapping):
            layers = [Layer(n, t, (pools or {}).get(n, "none")) for n, t in layers.items()]
        self.layers = list(layers)
        self.pools = {lay.name: (pools or {}).get(lay.name, lay.pool) for lay in self.layers}
        self.normalize = normalize
        self.targets = list(dict.fromkeys(lay.target for lay in self.layers))
        self._hooked: dict[str, torch.Tensor] = {}
        model = model.eval()
        try:
            from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

            nodes = nodes or get_graph_node_names(model)[1]
            # A module name means the last node inside it; two names may meet at one node.
            self.nodes = {t: t if t in nodes else [n for n in nodes if n.startswith(t + ".")][-1]
                          for t in self.targets}
            body = create_feature_extractor(model, return_nodes={n: n for n in set(self.nodes.values())})
            _protect_outputs(body)
            if fold_bn:
                from torch.fx.experimental.optimization import fuse

                body = fuse(body, inplace=True, no_trace=True)  # new convs; the model keeps its own
            self.body, self.mode = body, "fx"
        except Exception:
            self.body, self.mode = model, "hooks"
            self.nodes = {t: t for t in self.targets}
            modules = dict(model.named_modules())
            for target in self.targets:
                if target not in modules:
                    raise UsageError(f"layer {target!r} is not a module of this (untraceable) model")
                modules[target].register_forward_hook(self._hook(target))

    def _hook(self, target: str) -> Any:
        def save(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._hooked[target] = (output[0] if isinstance(output, (tuple, list)) else output).clone()

        return save

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mode == "fx":
            raw = self.body(x)
        else:
            self._hooked.clear()
            self.body(x)
            raw, self._hooked = self._hooked, {}
        out = {}
        # Pool in float32 even under --amp: bilinear pooling's products lose too much in bf16.
        with _no_autocast(x.device):
            for lay in self.layers:
                feat = raw[self.nodes[lay.target]]
                if feat.dtype in (torch.float16, torch.bfloat16):
                    feat = feat.float()
                feat = pool_features(feat, self.pools[lay.name])
                out[lay.name] = l2_normalize(feat) if self.normalize else feat
        return out


def _no_autocast(device: torch.device) -> Any:
    if device.type in ("cpu", "cuda", "mps", "xpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
