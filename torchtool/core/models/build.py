"""Build a torchvision classification model by name with ``--weights``, the head fitted to the classes.

``--weights`` accepts ``DEFAULT`` (pretrained, through torchvision's cache under
TORCH_HOME), a weights enum name such as ``IMAGENET1K_V1``, ``none`` (random init) or a
local file (.pth/.pt state_dict, .safetensors, or a torchtool checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtool.core.models.heads import find_head, head_classes, num_outputs, replace_head
from torchtool.core.models.names import build_kwargs, check_arch
from torchtool.core.models.preprocess import Preprocess, preprocess_for
from torchtool.core.models.weights import WeightsChoice, ensure_downloaded, resolve_weights
from torchtool.core.output import Failure, UsageError


@dataclass
class BuiltModel:
    """A model ready to use, and what it was built from."""

    model: Any
    arch: str
    weights: str
    num_classes: int
    classes: list[str] | None
    preprocess: Preprocess
    head: str


def build_model(arch: str | None, weights: str | WeightsChoice = "DEFAULT", num_classes: int | None = None,
                device: Any = "cpu") -> BuiltModel:
    """Build ``arch`` with ``weights``; with ``num_classes`` the head is replaced to fit.

    With a torchtool checkpoint or a .safetensors file written by torchtool, ``arch`` may be
    None: the architecture, classes and preprocessing come from the file.
    """
    import torchvision

    choice = weights if isinstance(weights, WeightsChoice) else resolve_weights(arch, weights)
    if choice.arch and arch and choice.arch != arch:
        raise UsageError(f"--weights {choice.label} holds a {choice.arch} model, not {arch}",
                         hint=f"pass --model {choice.arch} or leave --model out")
    arch = check_arch(choice.arch or arch or "")
    kwargs = build_kwargs(arch, pretrained=choice.kind == "pretrained")
    classes = None
    if choice.kind == "pretrained":
        ensure_downloaded(choice.enum)
        model = torchvision.models.get_model(arch, weights=choice.enum, **kwargs)
        classes = list(choice.enum.meta.get("categories") or []) or None
        preprocess = preprocess_for(arch, choice.enum)
    else:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        preprocess = preprocess_for(arch)
    head, _ = find_head(model)
    if choice.file is not None:
        wf = choice.file
        file_classes = head_classes(wf.state_dict, head)
        if file_classes:
            replace_head(model, file_classes)
        try:
            model.load_state_dict(wf.state_dict)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise Failure(f"{wf.path} does not fit {arch}: {' '.join(lines[1:3])[:300]}",
                          hint="check --model matches the architecture the weights were saved from") from None
        classes = wf.classes
        if wf.preprocess:
            preprocess = Preprocess.from_dict(wf.preprocess)
    n_out = num_outputs(find_head(model)[1])
    if num_classes is not None and num_classes != n_out:
        replace_head(model, num_classes)
        classes, n_out = None, num_classes
    return BuiltModel(model.to(device), arch, choice.label, n_out, classes, preprocess, head)
