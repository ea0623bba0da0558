"""Supervised training on the labelled volumes only: Dice + cross-entropy."""

from __future__ import annotations

import torch

from frugalseg.losses.segmentation import dice_ce_loss, segmentation_loss
from frugalseg.methods.base import TRAIN, Method, MethodSpec, NoOptions, StepOutput


class Supervised(Method):
    """``L = DiceCE(net(x), y)`` on labelled batches. The pattern every later method follows."""

    Options = NoOptions

    @classmethod
    def declare(cls, options: NoOptions) -> MethodSpec:
        return MethodSpec(kind=TRAIN)

    def __init__(self, net: torch.nn.Module, options: NoOptions | None = None) -> None:
        super().__init__(net, options)
        self.loss_fn = dice_ce_loss()

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        logits = self.net(batch["image"])
        loss = segmentation_loss(self.loss_fn, logits, batch["label"])
        return StepOutput(loss, {"loss_dice_ce": loss.detach()})
