"""Supervised segmentation loss: Dice + cross-entropy (thin over MONAI's ``DiceCELoss``)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss


def dice_ce_loss(smooth: float = 1e-5, batch: bool = True) -> DiceCELoss:
    """Soft Dice (over foreground and background, batch-wise as in nnU-Net) + cross-entropy, equal weights.

    Call as ``loss(logits (B, K, *S), target (B, 1, *S) int)``.
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, batch=batch,
                      smooth_nr=smooth, smooth_dr=smooth)


def segmentation_loss(loss_fn: DiceCELoss, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Apply ``loss_fn`` to ``logits`` ``(B, K, *S)`` (any dtype; computed in fp32) and ``label`` ``(B, *S)``."""
    return loss_fn(logits.float(), label[:, None])
