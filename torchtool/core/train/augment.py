"""Training-time augmentation: presets, the region confusion mechanism, MixUp/CutMix wiring.

Everything random here draws from torch's global generator, so seeding it (finetune
seeds it per sample from the run seed, the epoch and the image index) fixes the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from torchtool.core.data.images import DecodeFloor
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


# RandomResizedCrop's area range per preset (torchvision's default aspect-ratio range, 3/4 to 4/3)
CROP_SCALE = {"standard": (0.08, 1.0), "light": (0.6, 1.0), "randaugment": (0.08, 1.0),
              "trivialaugment": (0.08, 1.0), "autoaugment": (0.08, 1.0)}
CROP_RATIO = (3 / 4, 4 / 3)
FLIPS = ("standard", "randaugment", "trivialaugment", "autoaugment")


def decode_floor(preset: str, image_size: int, resize_size: int) -> DecodeFloor:
    """How small ``--fast-decode`` may decode a training JPEG without a crop coming out upsampled.

    A RandomResizedCrop of area fraction s and aspect r of an image of area A is
    sqrt(A s r) x sqrt(A s / r), so its shorter side is never below sqrt(A s_min r_min): the
    decode keeps A >= image_size^2 / (s_min r_min) (and the short side >= image_size, for the
    whole-image fallback). ``none`` resizes the short side to ``resize_size``, as at validation.
    """
    if preset not in CROP_SCALE:
        return DecodeFloor(resize_size)
    return DecodeFloor(image_size, math.ceil(image_size ** 2 / (CROP_SCALE[preset][0] * CROP_RATIO[0])))


def _policy(preset: str, mode: InterpolationMode) -> list[Any]:
    """torchvision's automatic augmentation policies, with their published defaults."""
    if preset == "randaugment":
        return [v2.RandAugment(interpolation=mode)]  # 2 operations of magnitude 9, timm's rand-m9-n2
    if preset == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=mode)]
    if preset == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=mode)]
    return []


def train_transform(preset: str, image_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float],
                    interpolation: str = "bilinear", rcm: int = 0, rcm_neighbour: int = 1, *,
                    color_jitter: float = 0.0, random_erasing: float = 0.0, squash: bool = False) -> Any:
    """The training pipeline for an augmentation preset, ending in a normalised float tensor.

    standard: RandomResizedCrop (scale 0.08-1) and a horizontal flip, the ImageNet recipe;
    light: RandomResizedCrop (scale 0.6-1), no flip, for small or orientation-sensitive images;
    randaugment / trivialaugment / autoaugment: standard, then that torchvision policy;
    none: the evaluation Resize + CenterCrop (``squash``: both sides resized, timm's crop_mode). ``color_jitter`` S jitters brightness, contrast
    and saturation by up to S; ``rcm`` > 1 adds :class:`RegionConfusion`; ``random_erasing``
    P erases a random rectangle of the normalised tensor with probability P (timm's order).
    """
    if preset not in AUGMENTS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {', '.join(AUGMENTS)}")
    mode = InterpolationMode(interpolation)
    if preset in CROP_SCALE:
        steps = [v2.RandomResizedCrop(image_size, scale=CROP_SCALE[preset], ratio=CROP_RATIO, interpolation=mode,
                                      antialias=True)]
        steps += [v2.RandomHorizontalFlip()] if preset in FLIPS else []
    else:
        size = [resize_size, resize_size] if squash else resize_size
        steps = [v2.Resize(size, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    steps += _policy(preset, mode)
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps.append(v2.PILToTensor())
    if rcm > 1:
        steps.append(RegionConfusion(rcm, rcm_neighbour))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))  # 0 after Normalize: the mean colour
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
