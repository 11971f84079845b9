"""Build torchvision classification models by name, resolve weights, replace heads.

``--weights`` accepts ``DEFAULT`` (pretrained, through torchvision's cache under
TORCH_HOME), a weights enum name such as ``IMAGENET1K_V1``, ``none`` (random init) or a
local file (.pth/.pt state_dict, .safetensors, or a torchtool checkpoint).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchtool.core.checkpoint import WeightsFile, read_weights_file
from torchtool.core.output import Failure, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Models whose auxiliary heads only matter for their original training recipe.
_AUX_MODELS = ("googlenet", "inception_v3")


def classification_models() -> list[str]:
    """Names of every torchvision classification model."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def suggest(name: str, choices: list[str], n: int = 3) -> str:
    """'did you mean ...' text for a mistyped name ('' when nothing is close)."""
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else ""


def check_arch(arch: str) -> str:
    """Fail with suggestions unless ``arch`` is a torchvision classification model."""
    names = classification_models()
    if arch not in names:
        hint = suggest(arch, names) or "see torchvision.models.list_models() for the names"
        raise UsageError(f"unknown model {arch!r}", hint=hint)
    return arch


@dataclass
class Preprocess:
    """Evaluation preprocessing: resize, center crop, normalise (the weights' own transforms)."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {"crop_size": self.crop_size, "resize_size": self.resize_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(int(data["crop_size"]), int(data["resize_size"]), tuple(data["mean"]), tuple(data["std"]),
                   data.get("interpolation", "bilinear"))

    def resized(self, image_size: int | None = None, resize: int | None = None) -> Preprocess:
        """Override the crop (``--image-size``) and/or resize (``--resize``) keeping their ratio."""
        crop = image_size or self.crop_size
        if resize is None:
            resize = self.resize_size if image_size is None else round(crop * self.resize_size / self.crop_size)
        if resize < crop:
            raise UsageError(f"--resize {resize} is smaller than the crop {crop}")
        return Preprocess(crop, resize, self.mean, self.std, self.interpolation)


def _weights_enum(arch: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(arch)


def preprocess_for(arch: str, weights: Any = None) -> Preprocess:
    """The preprocessing of ``weights`` (a weights enum member) or of the arch's DEFAULT weights."""
    weights = weights or _weights_enum(arch).DEFAULT
    t = weights.transforms()
    return Preprocess(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std),
                      t.interpolation.value)


@dataclass
class WeightsChoice:
    """What ``--weights`` resolved to: an enum member, a local file, or nothing."""

    kind: str  # "pretrained" | "file" | "none"
    label: str
    enum: Any = None
    file: WeightsFile | None = None

    @property
    def arch(self) -> str | None:
        return self.file.arch if self.file else None


def resolve_weights(arch: str | None, spec: str) -> WeightsChoice:
    """Turn a ``--weights`` value into a :class:`WeightsChoice` (reads local files)."""
    if spec.lower() == "none":
        return WeightsChoice("none", "none")
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt") or path.exists() or os.sep in spec:
        wf = read_weights_file(path)
        return WeightsChoice("file", str(path.resolve()), file=wf)
    if arch is None:
        raise UsageError("--model is required unless --weights is a torchtool checkpoint")
    enum = _weights_enum(check_arch(arch))
    names = [m for m in enum.__members__]
    key = spec.split(".")[-1]
    if key not in enum.__members__:
        raise UsageError(f"{arch} has no weights named {spec!r}",
                         hint=f"choose from: {', '.join(names)}, none, or a local file")
    member = enum[key]
    return WeightsChoice("pretrained", f"{type(member).__name__}.{member.name}", enum=member)


def cached_weights_path(member: Any) -> Path:
    """Where torchvision keeps (or will keep) ``member``'s file under TORCH_HOME."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)


def ensure_downloaded(member: Any) -> Path:
    """Fetch ``member`` into torchvision's cache unless it is there; fail clearly when offline."""
    import torch

    path = cached_weights_path(member)
    if path.is_file():
        return path
    try:
        torch.hub.load_state_dict_from_url(member.url, progress=True, check_hash=True, map_location="cpu")
    except Exception as exc:  # URLError, timeouts, hash mismatch: all mean "not available here"
        raise Failure(
            f"cannot download {type(member).__name__}.{member.name} ({exc.__class__.__name__}: {str(exc)[:120]})",
            hint=f"torchvision expected the file at {path}; copy it there, or pass --weights PATH for a local "
            "file, or --weights none for random initialisation",
        ) from None
    return path


def find_head(model: Any) -> tuple[str, Any]:
    """The final classification layer (Linear, or the 1x1 Conv2d of SqueezeNet) and its name."""
    import torch.nn as nn

    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
            head = (name, module)
    if head is None:
        raise Failure(f"cannot find the classification head of {type(model).__name__}")
    return head


def num_outputs(module: Any) -> int:
    """Classes a head predicts."""
    return module.out_features if hasattr(module, "out_features") else module.out_channels


def replace_head(model: Any, num_classes: int) -> str:
    """Swap the final layer for a freshly initialised one with ``num_classes`` outputs."""
    import torch.nn as nn

    name, old = find_head(model)
    if num_outputs(old) == num_classes:
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


def _head_classes(state: dict[str, Any], head_name: str) -> int | None:
    weight = state.get(f"{head_name}.weight")
    return int(weight.shape[0]) if weight is not None else None


def build_kwargs(arch: str, pretrained: bool) -> dict[str, Any]:
    """Builder arguments: no auxiliary heads (GoogLeNet, Inception), quiet init for scratch models."""
    if arch not in _AUX_MODELS:
        return {}
    return {"aux_logits": False} if pretrained else {"aux_logits": False, "init_weights": True}


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
    meta: dict[str, Any] = field(default_factory=dict)


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
        file_classes = _head_classes(wf.state_dict, head)
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
