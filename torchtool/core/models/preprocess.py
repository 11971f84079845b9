"""Evaluation preprocessing (resize, center crop, normalise) as plain data, from the weights' own transforms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torchtool.core.models.names import weights_enum
from torchtool.core.models.timm_models import data_config, is_timm
from torchtool.core.output import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def parse_channels(text: str | None, what: str) -> tuple[float, ...] | None:
    """``--mean 0.5,0.5,0.5`` -> (0.5, 0.5, 0.5); one value stands for all three channels; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{what} {text!r}: expected three numbers, R,G,B (e.g. 0.5,0.5,0.5)")
    if what == "--std" and min(values) <= 0:
        raise UsageError(f"--std {text!r}: every value must be above 0")
    return values


def check_crop_pct(crop_pct: float | None) -> None:
    """``--crop-pct`` is a share of the resized image: in (0, 1]."""
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UsageError(f"--crop-pct {crop_pct} must be in (0, 1]", hint="e.g. 0.875 (224 of 256) or 1.0")


@dataclass
class Preprocess:
    """Evaluation preprocessing: resize, center crop, normalise (the weights' own transforms)."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_mode: str = "center"  # or "squash" (timm's): both sides resized to resize_size, then the crop

    def to_dict(self) -> dict[str, Any]:
        data = {"crop_size": self.crop_size, "resize_size": self.resize_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}
        return data if self.crop_mode == "center" else {**data, "crop_mode": self.crop_mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(int(data["crop_size"]), int(data["resize_size"]), tuple(data["mean"]), tuple(data["std"]),
                   data.get("interpolation", "bilinear"), data.get("crop_mode", "center"))

    def resized(self, image_size: int | None = None, resize: int | None = None, *, crop_pct: float | None = None,
                interpolation: str | None = None, mean: tuple[float, ...] | None = None,
                std: tuple[float, ...] | None = None) -> Preprocess:
        """Override the crop (``--image-size``) and the resize: ``--resize`` pixels, else the crop over
        ``crop_pct`` (the fraction of the resized short side the center crop keeps, timm's crop_pct),
        else the weights' own ratio; the ``interpolation`` of both resizes; the normalisation."""
        crop = image_size or self.crop_size
        check_crop_pct(crop_pct)
        if resize is not None and crop_pct is not None:
            raise UsageError("give --resize or --crop-pct, not both", hint="--crop-pct P resizes to crop / P")
        if resize is None and crop_pct is not None:
            resize = math.floor(crop / crop_pct + 1e-6)
        if resize is None:
            resize = self.resize_size if image_size is None else round(crop * self.resize_size / self.crop_size)
        if resize < crop:
            raise UsageError(f"--resize {resize} is smaller than the crop {crop}")
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise UsageError(f"unknown interpolation {interpolation!r}", hint=f"choose from: {', '.join(INTERPOLATIONS)}")
        return Preprocess(crop, resize, tuple(mean or self.mean), tuple(std or self.std),
                          interpolation or self.interpolation, self.crop_mode)

    def changes(self, other: Preprocess) -> str:
        """What ``other`` changes, e.g. ``crop_size 224 -> 32, resize_size 256 -> 32`` ("" when nothing)."""
        old, new = self.to_dict(), other.to_dict()
        return ", ".join(f"{k} {_shown(old[k])} -> {_shown(new[k])}" for k in old if old[k] != new[k])


def _shown(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)


def preprocess_for(arch: str, weights: Any = None) -> Preprocess:
    """The preprocessing of ``weights`` (a weights enum member) or of the arch's DEFAULT weights; a timm
    model's from timm's data config of its tag."""
    if is_timm(arch):
        data = data_config(arch)
        crop = int(data["input_size"][-1])
        return Preprocess(crop, math.floor(crop / data["crop_pct"]), tuple(data["mean"]), tuple(data["std"]),
                          data["interpolation"], data["crop_mode"])  # timm's own rounding of the resize
    weights = weights or weights_enum(arch).DEFAULT
    t = weights.transforms()
    return Preprocess(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std),
                      t.interpolation.value)


