"""Classification models by name (torchvision's, and timm's as ``timm:NAME``): checks with suggestions,
builder arguments."""

from __future__ import annotations

from typing import Any

from torchtool.core.models.timm_models import check_timm, is_timm, list_timm, timm_name
from torchtool.core.output import UsageError, suggest

# The model of commands that run an existing model when neither --model nor the weights file name one.
DEFAULT_MODEL = "resnet18"
# The classification models of torchvision 0.29, for tab completion (which must not import torchvision);
# tests/core/test_models_names.py says when the installed torchvision lists others.
KNOWN_MODELS = (
    'alexnet', 'convnext_base', 'convnext_large', 'convnext_small', 'convnext_tiny', 'densenet121',
    'densenet161', 'densenet169', 'densenet201', 'efficientnet_b0', 'efficientnet_b1', 'efficientnet_b2',
    'efficientnet_b3', 'efficientnet_b4', 'efficientnet_b5', 'efficientnet_b6', 'efficientnet_b7',
    'efficientnet_v2_l', 'efficientnet_v2_m', 'efficientnet_v2_s', 'googlenet', 'inception_v3', 'maxvit_t',
    'mnasnet0_5', 'mnasnet0_75', 'mnasnet1_0', 'mnasnet1_3', 'mobilenet_v2', 'mobilenet_v3_large',
    'mobilenet_v3_small', 'regnet_x_16gf', 'regnet_x_1_6gf', 'regnet_x_32gf', 'regnet_x_3_2gf',
    'regnet_x_400mf', 'regnet_x_800mf', 'regnet_x_8gf', 'regnet_y_128gf', 'regnet_y_16gf', 'regnet_y_1_6gf',
    'regnet_y_32gf', 'regnet_y_3_2gf', 'regnet_y_400mf', 'regnet_y_800mf', 'regnet_y_8gf', 'resnet101',
    'resnet152', 'resnet18', 'resnet34', 'resnet50', 'resnext101_32x8d', 'resnext101_64x4d',
    'resnext50_32x4d', 'shufflenet_v2_x0_5', 'shufflenet_v2_x1_0', 'shufflenet_v2_x1_5',
    'shufflenet_v2_x2_0', 'squeezenet1_0', 'squeezenet1_1', 'swin_b', 'swin_s', 'swin_t', 'swin_v2_b',
    'swin_v2_s', 'swin_v2_t', 'vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn', 'vgg16', 'vgg16_bn', 'vgg19',
    'vgg19_bn', 'vit_b_16', 'vit_b_32', 'vit_h_14', 'vit_l_16', 'vit_l_32', 'wide_resnet101_2',
    'wide_resnet50_2',
)
# Models whose auxiliary heads only matter for their original training recipe.
_AUX_MODELS = ("googlenet", "inception_v3")


def classification_models() -> list[str]:
    """Names of every torchvision classification model."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def list_models(pattern: str | None) -> list[str]:
    """Model names matching a glob: ``timm:*conv*`` asks timm, anything else torchvision."""
    import fnmatch

    pattern = pattern or "*"
    if is_timm(pattern):
        return list_timm(timm_name(pattern))
    return [n for n in classification_models() if fnmatch.fnmatchcase(n, pattern)]


def check_arch(arch: str) -> str:
    """Fail with suggestions unless ``arch`` is a torchvision classification model or a timm one (``timm:NAME``)."""
    if is_timm(arch):
        return check_timm(arch)
    names = classification_models()
    if arch not in names:
        hint = suggest(arch, names) or "list them with --list-models (timm's with --list-models 'timm:*')"
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


