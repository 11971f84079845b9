"""Evaluation transforms: uint8 resize + center crop in the loader workers, normalisation per batch on the device.

Pixel for pixel torchvision's ``Resize`` + ``CenterCrop`` (the weights' own preset), without
its per-call dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.functional import pil_modes_mapping


class CenterCrop:
    """Resize the shorter side to ``resize_size``, center-crop ``crop_size``: a uint8 HxWx3 tensor.

    Pixel for pixel what torchvision's ``Resize(resize_size)`` + ``CenterCrop(crop_size)`` give
    on a PIL image (the same PIL resample), without torchvision's per-call dispatch; the uint8
    result is 4x smaller to pass between processes than a float tensor. Normalise batches
    with :class:`Normalize`.
    """

    def __init__(self, crop_size: int, resize_size: int, interpolation: str = "bilinear", squash: bool = False):
        self.crop_size, self.resize_size, self.interpolation = crop_size, resize_size, interpolation
        self.squash = squash  # timm's crop_mode "squash": both sides to resize_size (the aspect ratio is not kept)
        self._resample = pil_modes_mapping[InterpolationMode(interpolation)]

    @classmethod
    def of(cls, preprocess: Any) -> CenterCrop:
        """The crop of a :class:`~torchtool.core.models.preprocess.Preprocess`."""
        p = preprocess
        return cls(p.crop_size, p.resize_size, p.interpolation, getattr(p, "crop_mode", "center") == "squash")

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = self.resize_size if self.squash else int(self.resize_size * long / short)  # torchvision's rounding
        new_w, new_h = (self.resize_size, new_long) if w <= h else (new_long, self.resize_size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self._resample)
        crop = self.crop_size
        if crop > min(new_w, new_h):  # torchvision pads with zeros
            return torch.from_numpy(np.array(v2.functional.center_crop(img, [crop]), dtype=np.uint8))
        top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
        return torch.from_numpy(np.asarray(img)[top:top + crop, left:left + crop].copy())


class Normalize:
    """uint8 ``N x H x W x 3`` batches -> normalised float ``N x 3 x H x W`` on ``device``.

    ``(x / 255 - mean) / std`` as one fused multiply-add (equal to torchvision's ToDtype +
    Normalize up to float rounding); the result is channels_last in memory, what
    convolutions want on CPU and GPU alike.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: Any = "cpu"):
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(device)

    def __call__(self, x: Any) -> Any:
        x = x.to(self.scale.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return torch.addcmul(self.shift, x, self.scale)


def eval_transform(crop_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bilinear", squash: bool = False) -> Any:
    """Resize, center crop, to float tensor, normalise: the weights' own evaluation preset, per image."""
    return EvalTransform(CenterCrop(crop_size, resize_size, interpolation, squash), mean, std)


class EvalTransform:
    """PIL image -> normalised float ``3 x H x W`` tensor, exactly as torchvision's preset computes it."""

    def __init__(self, crop: CenterCrop, mean: Sequence[float], std: Sequence[float]):
        self.crop = crop
        self.to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, img: Any) -> Any:
        return self.to_float(self.crop(img).permute(2, 0, 1).contiguous())


def preprocess_transform(preprocess: Any) -> Any:
    """:func:`eval_transform` for a :class:`~torchtool.core.models.preprocess.Preprocess`."""
    return EvalTransform(CenterCrop.of(preprocess), preprocess.mean, preprocess.std)
