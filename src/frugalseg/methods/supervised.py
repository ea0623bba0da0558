"""Supervised training on the labelled volumes only: Dice + cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn

from frugalseg.losses.segmentation import dice_ce_loss, segmentation_loss
from frugalseg.methods.base import StepOutput


class Supervised(nn.Module):
    """``L = DiceCE(net(x), y)`` on labelled batches. The pattern every later method follows."""

    needs_labels = True

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = dice_ce_loss()

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        logits = self.net(batch["image"])
        loss = segmentation_loss(self.loss_fn, logits, batch["label"])
        return StepOutput(loss, {"loss_dice_ce": loss.detach()})
