"""The layer names a model offers: friendly aliases, FX nodes, modules, with per-sample shapes.

Aliases: ``conv{b}_{i}``/``relu{b}_{i}``/``pool{b}``/``fc6-8`` for VGG, ``layer1-4`` for ResNets,
``gap`` (global average of the last feature map before the head, found by shape) and
``logits``. A timm model adds ``stage:K`` (its ``feature_info`` stages, as C x H x W maps like
its ``forward_intermediates``), and its ``gap`` is what its classifier takes (timm's pooled
``pre_logits``: the normed class token of a ViT). Shapes are computed on the meta device: no
memory, no real compute.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchtool.core.features.capture import Capture, traced_nodes
from torchtool.core.features.pooling import POOLS, stage_map
from torchtool.core.models.heads import find_head, num_outputs, replace_head
from torchtool.core.models.build import create_model
from torchtool.core.models.timm_models import classifier_name, is_timm_model, stage_modules
from torchtool.core.output import UsageError, suggest


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


@dataclass(frozen=True)
class Layer:
    """A requested layer: the name it is saved under, where it is read, how it is pooled."""

    name: str
    target: str
    pool: str
    stage: tuple[int, int] | None = None  # a timm stage: (channels, prefix tokens) to make its output C x H x W


def _meta_clone(model: nn.Module, arch: str) -> nn.Module:
    """The same network on the meta device (no memory), rebuilt by name when possible."""
    if next(model.parameters()).device.type == "meta":
        return model
    try:
        with torch.device("meta"):
            clone = create_model(arch)
            replace_head(clone, num_outputs(find_head(model)[1]))
        if [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]:
            return clone.eval()
    except Exception:  # some builders compute with tensors (regnet): copy instead
        pass
    return copy.deepcopy(model).to("meta").eval()


def _node_shapes(model: nn.Module, nodes: Sequence[str], image_size: int, arch: str = "") -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every node, computed on the meta device (no real compute)."""
    capture = Capture(_meta_clone(model, arch), nodes)
    with torch.no_grad():
        out = capture(torch.empty(1, 3, image_size, image_size, device="meta"))
    return {k: tuple(v.shape[1:]) for k, v in out.items() if isinstance(v, torch.Tensor)}


class LayerCatalog:
    """The layer names a model offers: aliases, FX nodes and modules."""

    def __init__(self, model: nn.Module, arch: str = ""):
        self.model = model
        self.arch = arch
        self.nodes = traced_nodes(model)
        self.modules = [n for n, _ in model.named_modules() if n]
        self.aliases: dict[str, str] = {}
        if arch.startswith("vgg") and hasattr(model, "features"):
            self.aliases.update(vgg_aliases(model))
        for i in range(1, 5):
            if hasattr(model, f"layer{i}"):
                self.aliases[f"layer{i}"] = f"layer{i}"
        self.aliases["logits"] = self.nodes[-1] if self.nodes else find_head(model)[0]
        self._gap: str | None = None
        self.stages: dict[str, tuple[str, tuple[int, int]]] = {}  # stage:K -> (module, (channels, prefix tokens))
        if is_timm_model(model):
            self._timm_aliases(model)

    def _timm_aliases(self, model: nn.Module) -> None:
        """stage:K for each feature stage; gap: the classifier's input (the node before it)."""
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        for k, (module, channels) in enumerate(stage_modules(model)):
            self.stages[f"stage:{k}"] = (module, (channels, prefix))
        head = classifier_name(model)
        if self.nodes:  # the node before the classifier's first (a Linear may trace as head or head.linear)
            first = next((i for i, n in enumerate(self.nodes) if n == head or n.startswith(f"{head}.")), 0)
            self._gap = self.nodes[first - 1] if first > 0 else ""
        else:  # untraceable (hooks): the global pool's output is what the classifier takes
            self._gap = next((m for m in ("global_pool", "head.global_pool") if m in self.modules), "")

    def gap_target(self, image_size: int = 224) -> str | None:
        """The last 4-D feature map before the classifier head (GAP of it is the pooled vector)."""
        if self._gap is None and self.nodes and not self.arch.startswith(("vit", "timm:")):
            head, _ = find_head(self.model)
            first_head = next((i for i, n in enumerate(self.nodes) if n == head or n.startswith(head + ".")),
                              len(self.nodes))
            shapes = _node_shapes(self.model, self.nodes[:first_head], image_size, self.arch)
            maps = [n for n in self.nodes[:first_head] if len(shapes.get(n, ())) == 3]
            self._gap = maps[-1] if maps else ""
        return self._gap or None

    def names(self) -> list[str]:
        """Every name :meth:`resolve` accepts."""
        # an alias, node and module may share a name (layer3): list each once
        return list(dict.fromkeys(list(self.aliases) + ["gap"] + list(self.stages) + (self.nodes or []) + self.modules))

    def resolve(self, spec: str, default_pool: str, pools: Mapping[str, str] | None = None) -> Layer:
        """``name`` or ``name:pool`` (``stage:K`` or ``stage:K:pool``) -> Layer; unknown names fail with the
        closest suggestions."""
        if spec.startswith("stage:"):
            number, _, pool = spec[len("stage:"):].partition(":")
            name = f"stage:{number}"
        else:
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
        if name in self.stages:
            module, stage = self.stages[name]
            return Layer(name, module, pool or default_pool, stage)
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
        stages = [m for m, _ in self.stages.values()]
        shapes = _node_shapes(self.model, list(dict.fromkeys(list(targets.values()) + stages + nodes)), image_size,
                              self.arch)
        if gap:
            rows.append({"name": "gap", "target": gap, "kind": "alias", "shape": [shapes[gap][0]]})
        for alias, (module, stage) in self.stages.items():
            shape = list(stage_map(torch.empty(1, *shapes[module], device="meta"), *stage).shape[1:]) \
                if module in shapes else []
            rows.append({"name": alias, "target": module, "kind": "stage", "shape": shape})
        for alias, target in targets.items():
            rows.append({"name": alias, "target": target, "kind": "alias", "shape": list(shapes.get(target, ()))})
        # an untraceable model's modules come from hooks: one without a shape is never run by its forward (a
        # block's unused drop-path), and asking for it would be an error; a traced node always runs
        kind = "node" if self.nodes else "module"
        rows.extend({"name": n, "target": n, "kind": kind, "shape": list(shapes.get(n, ()))}
                    for n in nodes if self.nodes or n in shapes)
        return rows
