"""Pooling of feature maps: none, global average, global max, bilinear; L2 normalisation."""

from __future__ import annotations

import torch
from torch.nn import functional as F

POOLS = ("none", "avg", "max", "bilinear")


def bilinear_pool(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Bilinear pooling: X·Xᵀ/(H·W) over positions, signed sqrt, L2-normalised, flattened.

    (N, C, H, W) -> (N, C*C). A 2-D (N, C) input is treated as one position.
    """
    x = x.float()
    x = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)
    gram = torch.bmm(x, x.transpose(1, 2)) / x.shape[-1]
    gram = gram.sign() * gram.abs().sqrt()
    return F.normalize(gram.flatten(1), dim=1, eps=eps)


def pool_features(x: torch.Tensor, how: str) -> torch.Tensor:
    """``none`` keeps the map; ``avg``/``max`` pool every spatial position (GAP/GMP); ``bilinear``."""
    if how == "none":
        return x
    if how == "bilinear":
        return bilinear_pool(x)
    if x.dim() <= 2:
        return x
    flat = x.flatten(2)
    if how == "avg":
        return flat.mean(-1)
    if how == "max":
        return flat.amax(-1)
    raise ValueError(f"unknown pooling {how!r}; choose from {POOLS}")


def stage_map(x: torch.Tensor, channels: int, prefix_tokens: int = 0) -> torch.Tensor:
    """A timm stage's output as N x C x H x W, as timm's ``forward_intermediates`` gives it: tokens
    (N x L x C, a ViT's) lose their ``prefix_tokens`` (class, register) and become a square grid;
    channels-last maps (N x H x W x C, a Swin's) are permuted; N x C x H x W stays."""
    if x.dim() == 3 and x.shape[-1] == channels:
        tokens = x[:, prefix_tokens:]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side == tokens.shape[1]:
            return tokens.transpose(1, 2).reshape(x.shape[0], channels, side, side)
        return tokens
    if x.dim() == 4 and x.shape[-1] == channels and x.shape[1] != channels:
        return x.permute(0, 3, 1, 2)
    return x


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale every sample's flattened vector to unit L2 norm (shape kept)."""
    return F.normalize(x.flatten(1).float(), dim=1).view(x.shape)
