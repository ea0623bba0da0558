"""Small heads that sit on top of a network's features during pre-training (dropped afterwards)."""

from __future__ import annotations

import torch
import torch.nn as nn


class MLPHead(nn.Sequential):
    """Linear(bias) -> BatchNorm1d -> ReLU -> Linear(no bias): BYOL's projector and predictor (Grill et al. 2020).

    Input ``(B, in_features)``, output ``(B, out_features)``.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features, bias=False))


def global_pool(feature: torch.Tensor) -> torch.Tensor:
    """Average over every spatial dim: ``(B, C, *spatial)`` -> ``(B, C)``."""
    return feature.flatten(2).mean(-1)


def encoder_width(net: nn.Module) -> int:
    """Channels of the deepest encoder feature of a U-Net (``channels[-1]``) or SwinUNETR (``16 × feature_size``)."""
    channels = getattr(net, "channels", None)
    return int(channels[-1]) if channels else int(16 * net.feature_size)
