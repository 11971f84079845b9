"""Multi-layer feature extraction from one forward pass, pooled and optionally L2-normalised.

    >>> from torchtool.core.features import FeatureExtractor
    >>> extractor = FeatureExtractor(model, ["layer3", "gap"], arch="resnet18").eval()
    >>> feats = extractor(batch)            # {"layer3": (N,256,14,14), "gap": (N,512)}
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchtool.core.features.capture import Capture
from torchtool.core.features.layers import Layer, LayerCatalog
from torchtool.core.features.pooling import l2_normalize, pool_features, stage_map
from torchtool.core.output import UsageError


class FeatureExtractor(nn.Module):
    """An nn.Module returning ``{name: features}`` for many layers from ONE forward pass.

    ``layers`` is a list of names (see :class:`LayerCatalog`), a ``{name: target}`` mapping
    (target: FX node or module name) or resolved :class:`Layer` s. The outputs are read by a
    :class:`~torchtool.core.features.capture.Capture` (FX, or hooks where the model does not
    trace); ``nodes`` (the model's FX node names, when already known) saves a trace;
    ``fold_bn`` folds BatchNorm into the convolutions (inference only, see Capture).
    ``pools`` maps names to a pooling in :data:`POOLS`; ``normalize`` L2-normalises each.
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
        self.capture = Capture(model, [lay.target for lay in self.layers], nodes, fold_bn)

    @property
    def mode(self) -> str:
        """How the outputs are read: "fx" or "hooks"."""
        return self.capture.mode

    @property
    def body(self) -> nn.Module:
        """The traced module that runs (or the model itself, with hooks)."""
        return self.capture.body

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.capture(x)
        out = {}
        # Pool in float32 even under --amp: bilinear pooling's products lose too much in bf16.
        with _no_autocast(x.device):
            for lay in self.layers:
                if lay.target not in raw:
                    raise UsageError(f"layer {lay.name!r} ({lay.target}) is not run by this model's forward pass",
                                     hint="run with --list-layers to see the layers that are")
                feat = raw[lay.target]
                if feat.dtype in (torch.float16, torch.bfloat16):
                    feat = feat.float()
                if lay.stage:
                    feat = stage_map(feat, *lay.stage)
                feat = pool_features(feat, self.pools[lay.name])
                out[lay.name] = l2_normalize(feat) if self.normalize else feat
        return out


def _no_autocast(device: torch.device) -> Any:
    if device.type in ("cpu", "cuda", "mps", "xpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
