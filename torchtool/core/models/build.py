"""Build a classification model by name with ``--weights``, the head fitted to the classes.

Names are torchvision's (``resnet50``) or timm's (``timm:convnext_tiny``, ``timm:NAME.TAG``).
``--weights`` accepts ``DEFAULT`` (pretrained, through torchvision's cache under TORCH_HOME,
or timm's own), a torchvision weights enum name such as ``IMAGENET1K_V1``, ``none`` (random
init) or a local file (.pth/.pt/.bin state_dict, .safetensors, or a torchtool checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtool.core.models.heads import find_head, head_classes, num_outputs, replace_head
from torchtool.core.models.names import DEFAULT_MODEL, build_kwargs, check_arch
from torchtool.core.models.preprocess import Preprocess, preprocess_for
from torchtool.core.models.timm_models import check_input_size, create_timm, is_timm, pretrained_classes
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

    def preprocessing(self, image_size: int | None = None, resize: int | None = None, **overrides: Any) -> Preprocess:
        """The preprocessing with the user's overrides (:meth:`Preprocess.resized`), checked against the model: a
        model with a fixed input size (timm's ViTs) refuses another crop in one line."""
        preprocess = self.preprocess.resized(image_size, resize, **overrides)
        check_input_size(self.model, preprocess.crop_size)
        return preprocess


def _misfit(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """'12 missing keys, 3 unexpected, 1 of another shape' for a state_dict that does not fit."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    shapes = [k for k in expected.keys() & found.keys() if tuple(expected[k].shape) != tuple(found[k].shape)]
    parts = [f"{n} {what}" for n, what in ((len(missing), "missing keys"), (len(unexpected), "unexpected keys"),
                                           (len(shapes), "of another shape")) if n]
    return ", ".join(parts)  # '' when it fits


def choose_weights(arch: str | None, weights: str, default_arch: str = DEFAULT_MODEL) -> tuple[str, WeightsChoice]:
    """(architecture, weights): ``arch`` when given, else the weights file's, else ``default_arch``.

    A file that holds another architecture than an explicit ``arch`` is refused.
    """
    choice = resolve_weights(arch or default_arch, weights)  # a file's own arch wins over the default
    if choice.arch and arch and choice.arch != arch:
        raise UsageError(f"--weights {choice.label} holds a {choice.arch} model, not {arch}",
                         hint=f"pass --model {choice.arch} or leave --model out")
    return check_arch(arch or choice.arch or default_arch), choice


def create_model(arch: str, weights: Any = None, **kwargs: Any) -> Any:
    """The bare network of ``arch``: torchvision's builder (``weights``: an enum member or None) or timm's
    ``create_model`` (``weights``: True for the tag's pretrained weights); ``kwargs`` go to the builder."""
    if is_timm(arch):
        return create_timm(arch, pretrained=bool(weights), **kwargs)
    import torchvision

    return torchvision.models.get_model(arch, weights=weights, **build_kwargs(arch, weights is not None) | kwargs)


def _built(arch: str, choice: WeightsChoice, meta: bool) -> tuple[Any, list[str] | None, Preprocess]:
    """(model, classes, preprocessing) of ``arch`` with pretrained weights or none (files are loaded later)."""
    if choice.kind != "pretrained":
        return create_model(arch), None, preprocess_for(arch)
    if is_timm(arch):
        model = create_model(arch, weights=not meta)  # meta: the architecture the weights fit, nothing fetched
        return model, pretrained_classes(model), preprocess_for(arch)
    classes = list(choice.enum.meta.get("categories") or []) or None
    if meta:  # the architecture the weights fit, without fetching their bytes
        model = create_model(arch, num_classes=len(classes) if classes else 1000)
    else:
        ensure_downloaded(choice.enum)
        model = create_model(arch, choice.enum)
    return model, classes, preprocess_for(arch, choice.enum)


def build_model(arch: str | None, weights: str | WeightsChoice = "DEFAULT", num_classes: int | None = None,
                device: Any = "cpu") -> BuiltModel:
    """Build ``arch`` with ``weights``; with ``num_classes`` the head is replaced to fit.

    With a torchtool checkpoint or a .safetensors file written by torchtool, ``arch`` may be
    None: the architecture, classes and preprocessing come from the file. On ``device="meta"``
    the model is built without memory for its weights (summary): nothing is downloaded, and a
    weights file is checked to fit rather than loaded.
    """
    import contextlib

    import torch

    choice = weights if isinstance(weights, WeightsChoice) else resolve_weights(arch, weights)
    if choice.arch and arch and choice.arch != arch:
        raise UsageError(f"--weights {choice.label} holds a {choice.arch} model, not {arch}",
                         hint=f"pass --model {choice.arch} or leave --model out")
    arch = check_arch(choice.arch or arch or "")
    meta = str(device) == "meta"
    with torch.device("meta") if meta else contextlib.nullcontext():  # meta: even a new head takes no memory
        model, classes, preprocess = _built(arch, choice, meta)
        head, _ = find_head(model)
        if choice.file is not None:
            wf = choice.file
            file_classes = head_classes(wf.state_dict, head)
            if file_classes:
                replace_head(model, file_classes)
            misfit = _misfit(model.state_dict(), wf.state_dict) if meta else ""
            try:
                if not misfit and not meta:
                    model.load_state_dict(wf.state_dict)
            except RuntimeError:
                misfit = _misfit(model.state_dict(), wf.state_dict) or "the tensors do not load"
            if misfit:
                raise Failure(f"{wf.path} does not fit {arch}: {misfit}",
                              hint="check --model matches the architecture the weights were saved from")
            classes = wf.classes
            if wf.preprocess:
                preprocess = Preprocess.from_dict(wf.preprocess)
        n_out = num_outputs(find_head(model)[1])
        if num_classes is not None and num_classes != n_out:
            replace_head(model, num_classes)
            classes, n_out = None, num_classes
    return BuiltModel(model.to(device), arch, choice.label, n_out, classes, preprocess, head)
