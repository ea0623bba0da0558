"""VoCo (Wu, Zhuang, Chen, CVPR 2024): volume contrast by predicting crop positions from base-crop similarities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from frugalseg.losses.voco import base_dissimilarity, overlap_logits, overlap_losses
from frugalseg.methods.base import PRETRAIN, Method, MethodSpec, StepOutput
from frugalseg.methods.options import OptionError, check_momentum, check_positive
from frugalseg.nn.ema import ema_update, frozen_copy
from frugalseg.nn.heads import global_pool


def pooled_width(net: nn.Module) -> int:
    """Channels of the concatenated globally pooled encoder features (every scale)."""
    channels = getattr(net, "channels", None)
    if channels:
        return int(sum(channels))
    return int(net.feature_size * (1 + 1 + 2 + 4 + 8 + 16))  # SwinUNETR: enc0..enc3, hidden3, bottleneck


@dataclass(frozen=True)
class VoCoOptions:
    """Attributes:
        volumes_per_step: volumes per step (official 2); ``data.batch_size`` is not used.
        crops: random crops per volume (official 2).
        grid: bases per in-plane axis; 0 = from the volume size in patches (3-4; official 4). At least 3: on a
            2 x 2 grid a base-sized crop overlaps every base and the negative (zero-overlap) term is empty.
        hidden, projection: head widths (official 2048, 2048; smaller for 2-core CPUs).
        teacher: the official code's EMA teacher (off: the CVPR paper's formulation).
        momentum: the teacher's EMA momentum (official 0.9, parameters only).
    """

    volumes_per_step: int = 2
    crops: int = 2
    grid: int = 0
    hidden: int = 512
    projection: int = 512
    teacher: bool = False
    momentum: float = 0.9

    def __post_init__(self) -> None:
        for name in ("volumes_per_step", "crops", "hidden", "projection"):
            check_positive(name, getattr(self, name))
        if 0 < self.grid < 3 or self.grid < 0:  # 2 x 2: every crop overlaps every base, no negative term
            raise OptionError("grid", f"must be 0 (automatic) or at least 3 (on a 2 x 2 grid a crop overlaps every "
                                      f"base and the negative term is empty), got {self.grid}")
        check_momentum("momentum", self.momentum)


class VoCo(Method):
    """Each step: ``volumes_per_step`` volumes, each as a grid of base crops plus ``crops`` random crops.

    Embedding = global average pool of every encoder scale, concatenated, then a projection head
    (Linear-BN-ReLU ×2, Linear; BatchNorm without affine or running statistics, over every crop of the step).
    ``L = L_pos + L_neg + L_reg`` (weights 1, 1, 1) as the paper and its code. With ``teacher=True`` the
    official repository's EMA teacher (not in the CVPR paper): predictions are ``½[l(p_s, q_t) + l(p_t, q_s)]``.
    The kept network is ``net``; head and teacher are dropped.
    """

    Options = VoCoOptions

    @classmethod
    def declare(cls, options: VoCoOptions) -> MethodSpec:
        from frugalseg.data.voco_crops import VoCoSampler

        def sampler(volumes, patch_size, seed, **_):
            return VoCoSampler(volumes, patch_size, seed, volumes_per_step=options.volumes_per_step,
                               crops=options.crops, grid=options.grid)

        return MethodSpec(kind=PRETRAIN, spatial_dims=(3,), partial_graph=True, sampler=sampler, network_parts=True)

    def __init__(self, net: nn.Module, options: VoCoOptions | None = None) -> None:
        super().__init__(net, options)
        o = self.options
        width = pooled_width(net)
        self.head = nn.Sequential(
            nn.Linear(width, o.hidden), nn.BatchNorm1d(o.hidden, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True), nn.Linear(o.hidden, o.hidden),
            nn.BatchNorm1d(o.hidden, affine=False, track_running_stats=False), nn.ReLU(inplace=True),
            nn.Linear(o.hidden, o.projection))
        self.teacher_net = frozen_copy(net) if o.teacher else None
        self.teacher_head = frozen_copy(self.head) if o.teacher else None

    @staticmethod
    def _embed(net: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return head(torch.cat([global_pool(f).float() for f in net.encode(x)], dim=1))

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        target = batch["overlap"].float()  # (V, R, K)
        v, r, k = target.shape
        z = self._embed(self.net, self.head, batch["image"]).view(v, k + r, -1)
        q, p = z[:, :k], z[:, k:]
        if self.teacher_net is not None:
            with torch.no_grad():
                self.teacher_net.train(self.training)
                zt = self._embed(self.teacher_net, self.teacher_head, batch["image"]).view(v, k + r, -1)
            logits = 0.5 * (overlap_logits(p, zt[:, :k]) + overlap_logits(zt[:, k:], q))
        else:
            logits = overlap_logits(p, q)
        pos, neg = overlap_losses(logits, target)
        reg = base_dissimilarity(q)
        loss = pos + neg + reg
        return StepOutput(loss, {"loss_pos": pos.detach(), "loss_neg": neg.detach(), "loss_reg": reg.detach(),
                                 "overlap_error": (logits - target).abs().mean().detach()})

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        if self.teacher_net is not None:
            ema_update(self.teacher_net, self.net, self.options.momentum)
            ema_update(self.teacher_head, self.head, self.options.momentum)
