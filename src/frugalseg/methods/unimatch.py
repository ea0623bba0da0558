"""UniMatch (Yang et al., CVPR 2023): weak-to-strong consistency, with two CutMix-ed strong views and dropout on
the encoder's features, for semi-supervised segmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.data.mixing import BoxSpec, paste
from frugalseg.losses.consistency import sigmoid_rampup
from frugalseg.losses.pseudo_labels import hard_labels
from frugalseg.losses.segmentation import masked_cross_entropy, masked_dice_loss
from frugalseg.methods.base import TRAIN, Method, MethodSpec, StepOutput, Stream
from frugalseg.methods.options import check_choice, check_fraction, check_momentum, check_non_negative
from frugalseg.nn.ema import ema_update, frozen_copy
from frugalseg.nn.unet import crop_to

# UniMatch's CutMix: with p 0.5, a box of 2-40 % of the image, aspect ratio 0.3-3.3; one per strong view
CUTMIX = BoxSpec(count=2, probability=0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3))


def mix_partner(x: torch.Tensor) -> torch.Tensor:
    """The sample each sample takes its pasted box from: the next one in the batch (the last takes the first)."""
    return torch.roll(x, shifts=1, dims=0)


@dataclass(frozen=True)
class UniMatchOptions:
    """Attributes:
        confidence: pseudo-labels below this softmax confidence are ignored (paper 0.95).
        weight_strong: weight of each of the two strong views' losses (paper 0.25).
        weight_fp: weight of the feature-perturbation loss (paper 0.5).
        dropout: Dropout2d/3d rate on every encoder feature of the perturbed stream (paper 0.5).
        rampup: fraction of training over which the unlabelled weights ramp up (sigmoid); 0 = from the start
            (paper). A run that starts from a supervised model can take them at once; from scratch, early
            pseudo-labels are noise.
        teacher: ``student`` (paper: the network's own prediction on the weak view, detached) or ``ema`` (an EMA
            copy of the network predicts the pseudo-labels: steadier when few labels make them noisy).
        ema: the EMA teacher's momentum (``teacher=ema`` only).
        separate_bn: pass the labelled and the unlabelled batch through the network separately, so that BatchNorm
            normalises each with its own statistics (as ``mean_teacher`` here; measured better, see
            ``docs/methods/unimatch.md``); ``false`` = the paper's one joint pass.
    """

    confidence: float = 0.95
    weight_strong: float = 0.25
    weight_fp: float = 0.5
    dropout: float = 0.5
    rampup: float = 0.0
    teacher: str = "student"
    ema: float = 0.99
    separate_bn: bool = True

    def __post_init__(self) -> None:
        check_fraction("confidence", self.confidence)
        check_non_negative("weight_strong", self.weight_strong)
        check_non_negative("weight_fp", self.weight_fp)
        check_fraction("dropout", self.dropout)
        check_fraction("rampup", self.rampup)
        check_choice("teacher", self.teacher, ("student", "ema"))
        check_momentum("ema", self.ema)


class UniMatch(Method):
    """``L = ½[L_x + w_s·(L_s1 + L_s2) + w_fp·L_fp]`` (paper: w_s = 0.25, w_fp = 0.5).

    * ``L_x = ½(CE + Dice)`` on the labelled batch.
    * The weak view ``u_w`` of the unlabelled batch gives hard pseudo-labels and their confidence (no gradient).
    * Two strong views (colour jitter, blur), each CutMix-ed with its own box: inside the box the image, the
      pseudo-label and the confidence come from the next sample of the batch. ``L_s = Dice`` against the mixed
      pseudo-labels, ignoring voxels whose confidence is below the threshold.
    * Feature perturbation: the encoder features of ``u_w`` are decoded a second time after channel dropout
      (every level); ``L_fp = Dice`` of that prediction against ``u_w``'s pseudo-labels, same ignore rule.

    By default the labelled and the unlabelled batch go through the network apart (BatchNorm statistics per
    stream); ``separate_bn=false`` sends ``[x; u_w]`` through the encoder together, as the official code. The clean
    and the perturbed unlabelled features go through one decoder pass.
    """

    Options = UniMatchOptions

    @classmethod
    def declare(cls, options: UniMatchOptions) -> MethodSpec:
        return MethodSpec(kind=TRAIN, unlabelled=Stream(strong_views=2), boxes=CUTMIX, network_parts=True)

    def __init__(self, net: nn.Module, options: UniMatchOptions | None = None) -> None:
        super().__init__(net, options)
        self.teacher = frozen_copy(net) if self.options.teacher == "ema" else None

    def _dropout(self, feature: torch.Tensor) -> torch.Tensor:
        drop = F.dropout2d if feature.dim() == 4 else F.dropout3d
        return drop(feature, self.options.dropout, training=True)

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        o = self.options
        x, y, u_w = batch["image"], batch["label"], batch["u_image"]
        n_l, n_u = x.shape[0], u_w.shape[0]
        if o.separate_bn:  # labelled, then unlabelled (clean and perturbed in one decoder pass)
            logits_x = crop_to(self.net.decode(self.net.encode(x))[0], x.shape[2:])
            feats = self.net.encode(u_w)
            logits, _ = self.net.decode([torch.cat([f, self._dropout(f)]) for f in feats])
            logits_u, logits_fp = crop_to(logits, x.shape[2:]).split([n_u, n_u])
        else:
            feats = self.net.encode(torch.cat([x, u_w]))
            # clean [x; u_w] and perturbed u_w decoded in one pass
            logits, _ = self.net.decode([torch.cat([f, self._dropout(f[n_l:])]) for f in feats])
            logits = crop_to(logits, x.shape[2:])  # networks that pad to a multiple give padded maps
            logits_x, logits_u, logits_fp = logits.split([n_l, n_u, n_u])
        if self.teacher is not None:
            with torch.no_grad():
                self.teacher.train(self.training)
                pseudo, conf = hard_labels(self.teacher(u_w))
        else:
            pseudo, conf = hard_labels(logits_u)
        confident = conf >= o.confidence
        strong = []
        for view, key in (("strong1", "box"), ("strong2", "box2")):
            box = batch[key]
            image = paste(batch[f"u_{view}"], mix_partner(batch[f"u_{view}"]), box)
            strong.append((image, paste(pseudo, mix_partner(pseudo), box),
                           paste(confident, mix_partner(confident), box)))
        logits_s1, logits_s2 = self.net(torch.cat([s[0] for s in strong])).float().chunk(2)

        prob_x = logits_x.float().softmax(1)
        loss_x = 0.5 * (masked_cross_entropy(logits_x, y) + masked_dice_loss(prob_x, y))
        loss_s1 = masked_dice_loss(logits_s1.softmax(1), strong[0][1], strong[0][2])
        loss_s2 = masked_dice_loss(logits_s2.softmax(1), strong[1][1], strong[1][2])
        loss_fp = masked_dice_loss(logits_fp.float().softmax(1), pseudo, confident)
        ramp = sigmoid_rampup(progress, o.rampup)
        loss = 0.5 * (loss_x + ramp * (o.weight_strong * (loss_s1 + loss_s2) + o.weight_fp * loss_fp))
        return StepOutput(loss, {"loss_x": loss_x.detach(), "loss_s1": loss_s1.detach(), "loss_s2": loss_s2.detach(),
                                 "loss_fp": loss_fp.detach(), "confident": confident.float().mean(),
                                 "unlabelled_weight": ramp})

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.net, self.options.ema)
