"""BCP (Bai et al., CVPR 2023): mean-teacher self-training on labelled boxes pasted into unlabelled images and
unlabelled boxes pasted into labelled ones, after a labelled copy-paste stage (``copy_paste``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from frugalseg.data.mixing import BoxSpec, paste
from frugalseg.losses.consistency import sigmoid_rampup
from frugalseg.losses.pseudo_labels import hard_labels, largest_components
from frugalseg.losses.segmentation import mixed_region_loss
from frugalseg.methods.base import TRAIN, Method, MethodSpec, StepOutput, Stream
from frugalseg.methods.copy_paste import BCP_SIDE, halves
from frugalseg.methods.options import check_fraction, check_momentum, check_non_negative
from frugalseg.nn.ema import ema_update, frozen_copy


@dataclass(frozen=True)
class BCPOptions:
    """Attributes:
        ema: teacher momentum (BCP 0.99).
        u_weight: weight of the regions labelled by the teacher's pseudo-labels (BCP 0.5); labelled regions 1.
        side: the pasted box's fraction of each axis (BCP 2/3).
        largest_component: keep only the largest connected component of each class in the pseudo-labels (BCP).
        rampup: fraction of training over which the pseudo-labelled regions' weight ramps up (sigmoid); 0 = at
            once (BCP, which starts from the first stage's model).
    """

    ema: float = 0.99
    u_weight: float = 0.5
    side: float = BCP_SIDE
    largest_component: bool = True
    rampup: float = 0.0

    def __post_init__(self) -> None:
        check_momentum("ema", self.ema)
        check_non_negative("u_weight", self.u_weight)
        check_fraction("side", self.side)
        check_fraction("rampup", self.rampup)


class BCP(Method):
    """Self-training on bidirectionally pasted images with an EMA teacher's pseudo-labels.

    Labelled halves ``a``, ``b`` and unlabelled halves ``u_a``, ``u_b`` (one box for the batch): the student sees
    ``u_a`` with ``a``'s box pasted in, and ``b`` with ``u_b``'s box pasted in, in two passes. Each is compared
    region by region with the labels or the teacher's pseudo-labels of its sources (argmax, largest component per
    class), pseudo-labelled regions weighted ``u_weight``: ``L = ½(Dice_u + Dice_l + CE_u + CE_l)``. The teacher
    starts as the student (i.e. the first stage's model) and follows it by EMA.
    """

    Options = BCPOptions

    @classmethod
    def declare(cls, options: BCPOptions) -> MethodSpec:
        return MethodSpec(kind=TRAIN, unlabelled=Stream(), boxes=BoxSpec(side=options.side, per_batch=True),
                          min_batch_size=2)

    def __init__(self, net: nn.Module, options: BCPOptions | None = None) -> None:
        super().__init__(net, options)
        self.teacher = frozen_copy(net)

    @torch.no_grad()
    def _pseudo(self, image: torch.Tensor) -> torch.Tensor:
        self.teacher.train(self.training)
        logits = self.teacher(image)
        label, _ = hard_labels(logits)
        return largest_components(label, logits.shape[1]) if self.options.largest_component else label

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        o = self.options
        a, b = halves(batch["image"])
        la, lb = halves(batch["label"])
        ua, ub = halves(batch["u_image"])
        h = min(a.shape[0], ua.shape[0])
        a, b, la, lb, ua, ub = a[:h], b[:h], la[:h], lb[:h], ua[:h], ub[:h]
        box = batch["box"][:h]
        pa, pb = self._pseudo(ua), self._pseudo(ub)
        w = o.u_weight * sigmoid_rampup(progress, o.rampup)
        # unlabelled outside, labelled box inside; labelled outside, unlabelled box inside
        dice_u, ce_u = mixed_region_loss(self.net(paste(ua, a, box)), pa, la, box, w, 1.0)
        dice_l, ce_l = mixed_region_loss(self.net(paste(b, ub, box)), lb, pb, box, 1.0, w)
        loss = 0.5 * (dice_u + dice_l + ce_u + ce_l)
        return StepOutput(loss, {"loss_dice_u": dice_u.detach(), "loss_dice_l": dice_l.detach(),
                                 "loss_ce_u": ce_u.detach(), "loss_ce_l": ce_l.detach(), "u_weight": w})

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        ema_update(self.teacher, self.net, self.options.ema)
