"""PatchCL (Basak & Yin, CVPR 2023): mean teacher + pseudo-label-guided patch contrastive learning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.collectives import gather_uneven
from frugalseg.losses.consistency import sigmoid_rampup
from frugalseg.losses.patchcl import attended_patch_features, patch_statistics, plgcl_loss, select_patches
from frugalseg.losses.pseudo_labels import hard_labels
from frugalseg.losses.segmentation import dice_ce_loss, one_hot_channels, segmentation_loss
from frugalseg.methods.base import TRAIN, Incompatible, Method, MethodSpec, StepOutput
from frugalseg.methods.mean_teacher import TEACHER_STUDENT_VIEWS
from frugalseg.methods.options import (
    check_choice,
    check_fraction,
    check_momentum,
    check_non_negative,
    check_positive,
)
from frugalseg.nn.ema import ema_update, frozen_copy


def _joined(outputs):
    """Concatenate ``(logits, [decoder features])`` of two passes along the batch."""
    (l1, f1), (l2, f2) = outputs
    return torch.cat([l1, l2]), [torch.cat([a, b]) for a, b in zip(f1, f2, strict=True)]


@dataclass(frozen=True)
class PatchCLOptions:
    """Args:
        ema: teacher momentum.
        consistency: β, weight of L_reg (cross-entropy of the student on the strong view against the teacher's
            hard pseudo-label on the weak view) at the end of its ramp-up (the official code's 4).
        rampup: β's sigmoid ramp-up length as a fraction of training (ours; the paper does not say).
        confidence: pixels whose teacher confidence (softmax maximum on the weak view) is below this are left out of
            L_reg (they count in its mean as zeros, as FixMatch / UniMatch). Ours, chosen on val; 0 keeps every pixel
            (the paper).
        contrast: γ, weight of the patch contrastive loss (the official code's 0.5).
        warmup: fraction of training before the contrastive loss starts (the paper's warm-up: L_sup + β·L_reg).
        pseudo_labels: whose softmax gives the unlabelled images' class confidences C^k: ``student`` (the paper:
            its own detached prediction of the image it sees) or ``teacher`` (on the weak view).
        patch: patch side in input pixels (the grid is the patch size divided by it per axis).
        per_class: patches kept per class and step.
        queue: queue length per class (also ζ's default).
        embedding: embedding size D.
        temperature, lam: τ, λ of the bound.
        zeta: ζ, weight of the negatives (default: the queue length, as the official code's ψ).
        feature_block: which decoder block's output is embedded (``-2``: the one before the last, half resolution).
    """

    ema: float = 0.99
    consistency: float = 4.0
    rampup: float = 0.4
    confidence: float = 0.95
    contrast: float = 0.5
    warmup: float = 0.2
    pseudo_labels: str = "student"
    patch: int = 16
    per_class: int = 16
    queue: int = 512
    embedding: int = 64
    temperature: float = 0.2
    lam: float = 4.0
    zeta: float | None = None
    feature_block: int = -2

    def __post_init__(self) -> None:
        check_momentum("ema", self.ema)
        for name in ("consistency", "contrast"):
            check_non_negative(name, getattr(self, name))
        for name in ("rampup", "warmup", "confidence"):
            check_fraction(name, getattr(self, name))
        check_choice("pseudo_labels", self.pseudo_labels, ("student", "teacher"))
        for name in ("patch", "per_class", "queue", "embedding", "temperature"):
            check_positive(name, getattr(self, name))


class PatchCL(Method):
    """``L = L_sup + β·r(progress)·L_reg + γ·L_PLGCL`` with an EMA teacher (see ``docs/methods/patchcl.md``).

    ``L_reg`` is the cross-entropy of the student on the strong view against the teacher's hard pseudo-label on
    the weak view, on the pixels where the teacher is confident (``confidence``). After the warm-up, class
    confidences C^k come from the labels where they exist and from the student's softmax elsewhere; for each class
    the patches it dominates are ranked by the mean binary entropy of the attended image I ⊙ C^k, the most certain
    ``per_class`` are kept, and each is embedded from a decoder feature map attended by C^k (confidence-weighted
    pooling over the patch). The teacher's embeddings of the same patches fill per-class FIFO queues whose means and
    covariances define the closed-form contrastive bound for the student's embeddings.
    """

    Options = PatchCLOptions

    @classmethod
    def declare(cls, options: PatchCLOptions) -> MethodSpec:
        # some trainable parameters get no gradient in a step; decoder features at the patch's size
        return MethodSpec(kind=TRAIN, unlabelled=TEACHER_STUDENT_VIEWS, partial_graph=True, decoder_maps=True,
                          network_parts=True)

    def __init__(self, net: nn.Module, options: PatchCLOptions | None = None) -> None:
        super().__init__(net, options)
        o = self.options
        widths = getattr(net, "decoder_channels", None)
        if not widths:
            raise Incompatible("needs a network with a decoder (model.name=unet, genesis, ...)")
        self.zeta = float(o.zeta if o.zeta is not None else o.queue)
        width = int(widths[o.feature_block])
        self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(inplace=True),
                                  nn.Linear(2 * width, o.embedding))
        self.teacher = frozen_copy(net)
        self.teacher_head = frozen_copy(self.head)
        self.loss_fn = dice_ce_loss()
        k = net.out_channels
        self.register_buffer("queues", torch.zeros(k, o.queue, o.embedding))
        self.register_buffer("queue_count", torch.zeros(k, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(k, dtype=torch.long))

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, q, d = self.queues.shape
        means = torch.zeros(k, d, device=self.queues.device)
        covs = torch.zeros(k, d, d, device=self.queues.device)
        present = self.queue_count >= 2
        for c in range(k):
            n = int(min(self.queue_count[c].item(), q))
            if n >= 2:
                z = self.queues[c, :n]
                means[c] = z.mean(0)
                centred = z - means[c]
                covs[c] = centred.T @ centred / n  # biased, as the official code
        return means, covs, present

    @torch.no_grad()
    def _enqueue(self, emb: torch.Tensor, classes: torch.Tensor) -> None:
        q = self.queues.shape[1]
        for z, c in zip(F.normalize(emb.float(), dim=-1), classes.tolist(), strict=True):
            self.queues[c, self.queue_ptr[c]] = z
            self.queue_ptr[c] = (self.queue_ptr[c] + 1) % q
            self.queue_count[c] += 1

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        o = self.options
        n = batch["image"].shape[0]
        # the warm-up trains L_sup + β·L_reg only (the paper); γ = 0 skips the patch work altogether
        contrast = progress >= o.warmup and o.contrast > 0
        # labelled and unlabelled streams in separate passes (BatchNorm statistics per stream, as mean_teacher)
        logits, dec = _joined([self.net.decode(self.net.encode(batch[k])) for k in ("image", "u_image")])
        sup = segmentation_loss(self.loss_fn, logits[:n], batch["label"])
        with torch.no_grad():
            self.teacher.train(self.training)
            if contrast:  # teacher features of both streams: the teacher embeddings of the patches
                t_logits, t_dec = _joined([self.teacher.decode(self.teacher.encode(batch[k]))
                                           for k in ("image", "u_view2")])
                t_u = t_logits[n:]
            else:
                t_u = self.teacher(batch["u_view2"])
        # L_reg: cross-entropy of the student on the strong view against the teacher's pseudo-label on the weak view
        pseudo, t_prob = hard_labels(t_u)
        confident = t_prob >= o.confidence  # the rest count as zeros in the mean (FixMatch / UniMatch)
        cons = (F.cross_entropy(logits[n:].float(), pseudo, reduction="none") * confident).mean()
        weight = o.consistency * sigmoid_rampup(progress, o.rampup)

        plgcl, n_picks = logits.new_zeros(()), 0
        if contrast:
            k = logits.shape[1]
            onehot = one_hot_channels(batch["label"], k, torch.float32)
            if o.pseudo_labels == "student":  # the paper: the student's own (detached) prediction of its input
                u_conf, u_image = logits[n:].detach().float().softmax(1), batch["u_image"]
            else:
                u_conf, u_image = t_u.float().softmax(1), batch["u_view2"]
            conf = torch.cat([onehot, u_conf])
            picks = select_patches(*patch_statistics(conf, o.patch, torch.cat([batch["image"], u_image])),
                                   o.per_class)
            n_picks = len(picks)
            if picks:
                classes = torch.tensor([p[1] for p in picks], device=logits.device)
                s_emb = self.head(attended_patch_features(dec[o.feature_block], conf, picks, o.patch))
                with torch.no_grad():
                    t_emb = self.teacher_head(attended_patch_features(t_dec[o.feature_block], conf, picks, o.patch))
                means, covs, present = self._statistics()
                keep = present[classes]  # classes without queue statistics yet contribute nothing this step
                if present.sum() >= 2 and keep.any():
                    plgcl = plgcl_loss(s_emb[keep], classes[keep], means, covs, present, o.temperature, o.lam,
                                       self.zeta)
            else:
                t_emb = self.queues.new_zeros((0, self.queues.shape[2]))
                classes = torch.zeros(0, dtype=torch.long, device=logits.device)
            # under torchrun every rank enqueues every rank's embeddings: the queues stay identical
            self._enqueue(gather_uneven(t_emb.float()), gather_uneven(classes))
        loss = sup + weight * cons + o.contrast * plgcl
        return StepOutput(loss, {"loss_dice_ce": sup.detach(), "loss_consistency": cons.detach(),
                                 "loss_plgcl": plgcl.detach(), "patches": float(n_picks),
                                 "confident": confident.float().mean()})

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        ema_update(self.teacher, self.net, self.options.ema)
        ema_update(self.teacher_head, self.head, self.options.ema)
