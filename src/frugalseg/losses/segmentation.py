"""Supervised segmentation loss: soft Dice (batch-wise) + cross-entropy, equal weights.

The same formula as MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)``; written out so that the
batch Dice sums cover the whole batch of a multi-process (``torchrun``) job, not each rank's shard.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.collectives import sum_across_ranks


class DiceCE(nn.Module):
    """``1 − mean_k (2·Σ p_k g_k + s) / (Σ g_k + Σ p_k + s) + CE``; sums over the batch and space (nnU-Net's batch
    Dice) or per sample (``batch=False``), over foreground and background classes.

    Call as ``loss(logits (B, K, *S), target (B, 1, *S) int)``.
    """

    def __init__(self, smooth: float = 1e-5, batch: bool = True) -> None:
        super().__init__()
        self.smooth, self.batch = smooth, batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target[:, 0].long()
        k = logits.shape[1]
        ce = F.cross_entropy(logits, target)  # a per-voxel mean: DDP's gradient averaging makes it global
        prob = logits.softmax(1)
        onehot = F.one_hot(target, k).movedim(-1, 1).to(prob.dtype)
        dims = [0, *range(2, logits.dim())] if self.batch else list(range(2, logits.dim()))
        sums = torch.stack([(prob * onehot).sum(dims), onehot.sum(dims), prob.sum(dims)])
        if self.batch:
            sums = sum_across_ranks(sums)
        dice = 1.0 - (2.0 * sums[0] + self.smooth) / (sums[1] + sums[2] + self.smooth)
        return dice.mean() + ce


def dice_ce_loss(smooth: float = 1e-5, batch: bool = True) -> DiceCE:
    """Soft Dice (over foreground and background, batch-wise as in nnU-Net) + cross-entropy, equal weights."""
    return DiceCE(smooth, batch)


def segmentation_loss(loss_fn: nn.Module, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Apply ``loss_fn`` to ``logits`` ``(B, K, *S)`` (any dtype; computed in fp32) and ``label`` ``(B, *S)``."""
    return loss_fn(logits.float(), label[:, None])
