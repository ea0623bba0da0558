"""Copy-paste between labelled images (BCP's first stage, Bai et al., CVPR 2023): supervised training on
labelled slices or patches with a box of another labelled image pasted in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugalseg.data.mixing import BoxSpec, paste
from frugalseg.losses.segmentation import mixed_region_loss
from frugalseg.methods.base import TRAIN, Method, MethodSpec, StepOutput
from frugalseg.methods.options import check_fraction

BCP_SIDE = 2 / 3  # the pasted box covers 2/3 of each axis (BCP's generate_mask), one box per batch


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second half of a batch (an odd batch leaves its last sample out)."""
    h = x.shape[0] // 2
    return x[:h], x[h:2 * h]


@dataclass(frozen=True)
class CopyPasteOptions:
    """Attributes:
        side: the pasted box's fraction of each axis (BCP 2/3).
    """

    side: float = BCP_SIDE

    def __post_init__(self) -> None:
        check_fraction("side", self.side)


class CopyPaste(Method):
    """BCP's first stage, labelled volumes only: the batch's second half pasted into its first inside one box
    (``a`` outside, ``b`` inside), the labels pasted alike; ``L = ½(Dice_out + Dice_in + CE_out + CE_in)``."""

    Options = CopyPasteOptions

    @classmethod
    def declare(cls, options: CopyPasteOptions) -> MethodSpec:
        return MethodSpec(kind=TRAIN, boxes=BoxSpec(side=options.side, per_batch=True), min_batch_size=2)

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        a, b = halves(batch["image"])
        la, lb = halves(batch["label"])
        box = batch["box"][: a.shape[0]]
        logits = self.net(paste(a, b, box))
        dice, ce = mixed_region_loss(logits, la, lb, box, 1.0, 1.0)
        loss = 0.5 * (dice + ce)
        return StepOutput(loss, {"loss_dice": dice.detach(), "loss_ce": ce.detach()})


