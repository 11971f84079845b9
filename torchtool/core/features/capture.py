"""The raw outputs of many nodes or modules from ONE forward pass (FX where the model traces, else hooks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchtool.core.models.fuse import fold_batchnorm
from torchtool.core.output import UsageError


def traced_nodes(model: nn.Module) -> list[str] | None:
    """The model's FX node names (torchvision's ``get_graph_node_names``), None when it does not trace."""
    from torchvision.models.feature_extraction import get_graph_node_names

    training = model.training  # tracing switches the model to train mode and, when it fails, leaves it there
    try:
        return get_graph_node_names(model)[1]
    except Exception:  # not FX-traceable: hooks are used instead
        return None
    finally:
        model.train(training)


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


class Capture(nn.Module):
    """``{target: tensor}`` for every target (an FX node or module name) from one forward pass.

    A module name means the last node inside it. torchvision's ``create_feature_extractor``
    where the model traces, else forward hooks that clone outputs (``mode`` says which).
    ``fold_bn`` folds each eval-mode BatchNorm into the convolution before it unless that
    convolution's own output is requested: the same outputs up to float rounding, ~15%
    faster on CPU, for inference only. The model keeps its own convolutions and BatchNorm.
    """

    def __init__(self, model: nn.Module, targets: Sequence[str], nodes: Sequence[str] | None = None,
                 fold_bn: bool = False):
        super().__init__()
        self.targets = list(dict.fromkeys(targets))
        self._hooked: dict[str, torch.Tensor] = {}
        model = model.eval()
        try:
            from torchvision.models.feature_extraction import create_feature_extractor

            nodes = nodes or traced_nodes(model)
            if nodes is None:
                raise TypeError("not traceable")
            self.nodes = {t: t if t in nodes else [n for n in nodes if n.startswith(t + ".")][-1]
                          for t in self.targets}
            body = create_feature_extractor(model, return_nodes={n: n for n in set(self.nodes.values())})
            _protect_outputs(body)
            if fold_bn:
                body = fold_batchnorm(body, traced=True)  # new convs; the model keeps its own
            self.body, self.mode = body, "fx"
        except Exception:
            self.body, self.mode = model, "hooks"
            self.nodes = {t: t for t in self.targets}
            modules = dict(model.named_modules())
            for target in self.targets:
                if target not in modules:
                    raise UsageError(f"layer {target!r} is not a module of this (untraceable) model") from None
                modules[target].register_forward_hook(self._hook(target))

    def _hook(self, target: str) -> Any:
        def save(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._hooked[target] = (output[0] if isinstance(output, (tuple, list)) else output).clone()

        return save

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{target: output}``; a hooked module the forward pass never calls (a block's unused drop-path) is left out."""
        if self.mode == "fx":
            raw = self.body(x)
        else:
            self._hooked.clear()
            self.body(x)
            raw, self._hooked = self._hooked, {}
        return {t: raw[node] for t, node in self.nodes.items() if node in raw}
