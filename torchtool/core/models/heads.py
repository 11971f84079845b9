"""The classification head of any torchvision or timm model: find it, count its classes, replace it.

A timm model names its own head (its pretrained config's ``classifier``) and replaces it with
``reset_classifier``, which keeps its pooling; any other model's head is its last Linear (or
SqueezeNet's 1x1 convolution).
"""

from __future__ import annotations

from typing import Any

from torchtool.core.models.timm_models import classifier_name, is_timm_model
from torchtool.core.output import Failure


def find_head(model: Any) -> tuple[str, Any]:
    """The final classification layer (Linear, or the 1x1 Conv2d of SqueezeNet; a timm model's own
    classifier, an Identity when it has none) and its name."""
    import torch.nn as nn

    if is_timm_model(model) and (name := classifier_name(model)):
        return name, model.get_submodule(name)
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
            head = (name, module)
    if head is None:
        raise Failure(f"cannot find the classification head of {type(model).__name__}")
    return head


def num_outputs(module: Any) -> int:
    """Classes a head predicts (0 for a timm model without a classifier)."""
    return getattr(module, "out_features", None) or getattr(module, "out_channels", 0)


def replace_head(model: Any, num_classes: int) -> str:
    """Swap the final layer for a freshly initialised one with ``num_classes`` outputs."""
    import torch.nn as nn

    name, old = find_head(model)
    if num_outputs(old) == num_classes:
        return name
    if is_timm_model(model):
        like = next(model.parameters())
        model.reset_classifier(num_classes)
        model.get_submodule(name).to(device=like.device, dtype=like.dtype)
        return name
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return name


def head_classes(state: dict[str, Any], head_name: str) -> int | None:
    """Classes of the head ``head_name`` in a state_dict (None when it is not there)."""
    weight = state.get(f"{head_name}.weight")
    return int(weight.shape[0]) if weight is not None else None


