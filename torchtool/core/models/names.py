"""torchvision's classification models by name: the list, checks with suggestions, builder arguments."""

from __future__ import annotations

from typing import Any

from torchtool.core.output import UsageError, suggest

# The model of commands that run an existing model when neither --model nor the weights file name one.
DEFAULT_MODEL = "resnet18"
# Models whose auxiliary heads only matter for their original training recipe.
_AUX_MODELS = ("googlenet", "inception_v3")


def classification_models() -> list[str]:
    """Names of every torchvision classification model."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> str:
    """Fail with suggestions unless ``arch`` is a torchvision classification model."""
    names = classification_models()
    if arch not in names:
        hint = suggest(arch, names) or "see torchvision.models.list_models() for the names"
        raise UsageError(f"unknown model {arch!r}", hint=hint)
    return arch


def weights_enum(arch: str) -> Any:
    """The weights enum of ``arch`` (e.g. ResNet18_Weights)."""
    import torchvision

    return torchvision.models.get_model_weights(arch)


def build_kwargs(arch: str, pretrained: bool) -> dict[str, Any]:
    """Builder arguments: no auxiliary heads (GoogLeNet, Inception), quiet init for scratch models."""
    if arch not in _AUX_MODELS:
        return {}
    return {"aux_logits": False} if pretrained else {"aux_logits": False, "init_weights": True}


