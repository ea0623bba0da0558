"""Small heads that sit on top of a network's features during pre-training (dropped afterwards)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class MLPHead(nn.Sequential):
    """Linear(bias) -> BatchNorm1d -> ReLU -> Linear(no bias): BYOL's projector and predictor (Grill et al. 2020).

    Input ``(B, in_features)``, output ``(B, out_features)``.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features, bias=False))


class _GlobalPool(torch.autograd.Function):
    """The spatial mean, whose gradient comes in the memory layout of the feature map. PyTorch's own comes in the
    default layout: added to the channels-last gradient that reaches the same map through the next convolution,
    it turned the sum into the default layout, and the LeakyReLU backward of that map - given its two inputs in
    different layouts - ran 4x slower (~40 of a 400 ms VoCo step); a broadcast view of the gradient, the other
    candidate, made it 7x slower where the pool is the map's only use."""

    @staticmethod
    def forward(ctx, feature: torch.Tensor) -> torch.Tensor:
        ctx.shape = feature.shape
        last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(feature.dim())
        ctx.layout = (last if last is not None and not feature.is_contiguous()
                      and feature.is_contiguous(memory_format=last) else torch.contiguous_format)
        return feature.mean(dim=tuple(range(2, feature.dim())))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        spatial = ctx.shape[2:]
        mean_grad = (grad / math.prod(spatial)).view(*grad.shape, *[1] * len(spatial))
        return mean_grad.expand(ctx.shape).contiguous(memory_format=ctx.layout)


def global_pool(feature: torch.Tensor) -> torch.Tensor:
    """Average over every spatial dim: ``(B, C, *spatial)`` -> ``(B, C)``."""
    return _GlobalPool.apply(feature)


def encoder_width(net: nn.Module) -> int:
    """Channels of the deepest encoder feature of a U-Net (``channels[-1]``) or SwinUNETR (``16 × feature_size``)."""
    channels = getattr(net, "channels", None)
    return int(channels[-1]) if channels else int(16 * net.feature_size)
