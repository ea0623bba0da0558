"""BYOL (Grill et al., NeurIPS 2020) pre-training of a segmentation network's encoder, in 2-D or 3-D."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from frugalseg.losses.contrastive import symmetric_byol_loss
from frugalseg.methods.base import PRETRAIN, Method, MethodSpec, StepOutput, Stream
from frugalseg.methods.options import check_momentum, check_positive
from frugalseg.nn.ema import cosine_momentum, ema_update, frozen_copy
from frugalseg.nn.heads import MLPHead, encoder_width, global_pool


@dataclass(frozen=True)
class BYOLOptions:
    """Attributes:
        hidden: projector/predictor hidden width (paper 4096, smaller here for 2-core CPUs).
        projection: output dimension (paper 256).
        momentum: τ_base (paper 0.99-0.996 depending on schedule length; short schedules want 0.99).
    """

    hidden: int = 1024
    projection: int = 256
    momentum: float = 0.99

    def __post_init__(self) -> None:
        check_positive("hidden", self.hidden)
        check_positive("projection", self.projection)
        check_momentum("momentum", self.momentum)


class BYOL(Method):
    """Online encoder + projector + predictor regress the EMA target's projection of another view.

    The target (encoder and projector) starts as a copy of the online ones and only moves by
    ``ξ ← τξ + (1 − τ)θ`` after each optimiser step, parameters and BatchNorm buffers alike, with the cosine
    schedule τ: ``momentum`` → 1. No negatives. The kept network is ``net``; heads and target are dropped.
    """

    Options = BYOLOptions

    @classmethod
    def declare(cls, options: BYOLOptions) -> MethodSpec:
        # two augmented views of the same crops; the segmentation head gets no gradient
        return MethodSpec(kind=PRETRAIN, stream=Stream(views=2), partial_graph=True, network_parts=True)

    def __init__(self, net: nn.Module, options: BYOLOptions | None = None) -> None:
        super().__init__(net, options)
        o = self.options
        width = encoder_width(net)
        self.projector = MLPHead(width, o.hidden, o.projection)
        self.predictor = MLPHead(o.projection, o.hidden, o.projection)
        self.target_net = frozen_copy(net)
        self.target_projector = frozen_copy(self.projector)

    def _embed(self, net: nn.Module, projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return projector(global_pool(net.encode(x)[-1]).float())

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        x1, x2 = batch["image"], batch["view2"]
        both = torch.cat([x1, x2])
        z_online = self._embed(self.net, self.projector, both)
        p1, p2 = self.predictor(z_online).chunk(2)
        with torch.no_grad():
            self.target_net.train(self.training)
            z1, z2 = self._embed(self.target_net, self.target_projector, both).chunk(2)
        loss = symmetric_byol_loss(p1, p2, z1, z2)
        return StepOutput(loss, {"loss_byol": loss.detach(),
                                 "embedding_std": z_online.detach().float().std(0).mean()})

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        tau = cosine_momentum(self.options.momentum, progress)
        ema_update(self.target_net, self.net, tau)
        ema_update(self.target_projector, self.projector, tau)
