"""Contrastive and non-contrastive representation losses (pure functions of tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's per-sample loss ``‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z)`` (Grill et al. 2020, Eq. 2).

    Args:
        prediction: ``(B, D)`` online predictions ``q_θ(z_θ)``.
        target: ``(B, D)`` target projections ``z'_ξ``; the caller detaches them (stop-gradient).

    Returns:
        ``(B,)`` losses in [0, 4], computed in fp32.
    """
    p = F.normalize(prediction.float(), dim=-1, eps=1e-6)
    z = F.normalize(target.float(), dim=-1, eps=1e-6)
    return 2.0 - 2.0 * (p * z).sum(-1)


def symmetric_byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``mean_B[ℓ(p1, sg z2) + ℓ(p2, sg z1)]``: the symmetric sum of BYOL (range [0, 8])."""
    return (byol_regression(p1, z2.detach()) + byol_regression(p2, z1.detach())).mean()
