"""Training-time augmentation: presets, the region confusion mechanism, MixUp/CutMix wiring.

Everything random here draws from torch's global generator, so seeding it (finetune
seeds it per sample from the run seed, the epoch and the image index) fixes the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from torchtool.core.train.config import AUGMENTS


class RegionConfusion(v2.Transform):
    """Region confusion mechanism (Destruction and Construction Learning, Chen et al., CVPR 2019).

    The image is cut into ``n`` x ``n`` blocks that are shuffled locally: first within each
    row of blocks, then within each column, each block moving at most ``neighbour``
    positions along each axis. Pixels inside a block are untouched. When the height or
    width is not a multiple of ``n``, the few rows/columns left over at the bottom/right
    stay where they are.

    Works on tensors (``C,H,W`` or batched ``...,C,H,W``), ``tv_tensors.Image`` and PIL images.
    """

    def __init__(self, n: int, neighbour: int = 1) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"RegionConfusion needs n >= 1, got {n}")
        if neighbour < 0:
            raise ValueError(f"RegionConfusion needs neighbour >= 0, got {neighbour}")
        self.n = n
        self.neighbour = neighbour

    def _local_permutations(self) -> torch.Tensor:
        """``n`` permutations of ``range(n)``, each moving an element at most ``neighbour`` places.

        Sorting ``i + u_i`` with ``u_i ~ U[0, neighbour + 1)`` does it: every ``j > i + neighbour``
        keeps a larger key than ``i`` and every ``j < i - neighbour`` a smaller one.
        """
        keys = torch.arange(self.n, dtype=torch.float64) + torch.rand(self.n, self.n, dtype=torch.float64) * (
            self.neighbour + 1)
        return keys.argsort(dim=1)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"rows": self._local_permutations(), "cols": self._local_permutations()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.BoundingBoxes, tv_tensors.Mask, tv_tensors.KeyPoints)):
            return inpt  # a shuffled image has no meaningful boxes or masks; leave them alone
        if not isinstance(inpt, torch.Tensor):  # PIL
            from torchvision.transforms.v2 import functional as F

            return F.to_pil_image(self._shuffle(F.pil_to_tensor(inpt), params))
        out = self._shuffle(inpt.as_subclass(torch.Tensor), params)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    def _shuffle(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        n = self.n
        height, width = image.shape[-2:]
        bh, bw = height // n, width // n
        if n == 1 or bh == 0 or bw == 0:
            return image
        lead = image.shape[:-2]
        grid = image[..., : bh * n, : bw * n].reshape(*lead, n, bh, n, bw).movedim(-3, -2)  # ..., n, n, bh, bw
        # Row step: block (r, c) <- (r, rows[r, c]); column step: (r, c) <- (cols[c, r], c).
        # Composed, the final block (r, c) comes from (cols[c, r], rows[cols[c, r], c]).
        src_r = params["cols"].T
        src_c = params["rows"][src_r, torch.arange(n).expand(n, n)]
        shuffled = grid[..., src_r, src_c, :, :].movedim(-2, -3).reshape(*lead, bh * n, bw * n)
        out = image.clone()
        out[..., : bh * n, : bw * n] = shuffled
        return out


def train_transform(preset: str, image_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float],
                    interpolation: str = "bilinear", rcm: int = 0, rcm_neighbour: int = 1) -> Any:
    """The training pipeline for an augmentation preset, ending in a normalised float tensor.

    standard: RandomResizedCrop (scale 0.08-1) and a horizontal flip, the ImageNet recipe;
    light: RandomResizedCrop (scale 0.6-1), no flip, for small or orientation-sensitive images;
    none: the evaluation Resize + CenterCrop. ``rcm`` > 1 adds :class:`RegionConfusion`.
    """
    mode = InterpolationMode(interpolation)
    if preset == "standard":
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=mode, antialias=True),
                    v2.RandomHorizontalFlip()]
    elif preset == "light":
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), interpolation=mode, antialias=True)]
    elif preset == "none":
        geometry = [v2.Resize(resize_size, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {', '.join(AUGMENTS)}")
    steps = [*geometry, v2.PILToTensor()]
    if rcm > 1:
        steps.append(RegionConfusion(rcm, rcm_neighbour))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def batch_mixer(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> Any:
    """MixUp and/or CutMix on a batch ``(images, labels) -> (images, soft labels)``; None when both are 0.

    With both, each batch gets one of the two at random (timm's and torchvision's recipe).
    """
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
