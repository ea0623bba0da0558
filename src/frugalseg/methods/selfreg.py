"""SelfReg-UNet (Zhu et al., MICCAI 2024) as a regulariser wrapped around any training method with a U-Net."""

from __future__ import annotations

import torch
import torch.nn as nn

from frugalseg.losses.selfreg import internal_distillation, semantic_consistency
from frugalseg.methods.base import TRAIN, Incompatible, Method, StepOutput
from frugalseg.nn.unet import UNet


class SelfRegularised(Method):
    """``L = L_method + λ·[mean IFD(encoder) + mean IFD(decoder) + mean SCR(every layer vs the last decoder block)]``.

    A regulariser wraps any training method (``selfreg.weight > 0``) and declares what the method declares: same
    record, same options. Features are read with forward hooks on the U-Net's encoder blocks 2..L and decoder
    blocks, during the method's own forward pass of ``net`` (the student; EMA teachers are separate modules and
    are not read), so nothing is computed twice. The first (full-resolution) encoder block is not used, as in the
    official CNN variant; the last decoder block is the SCR teacher (detached).

    Args:
        method: a training method whose ``net`` is the U-Net.
        weight: λ (paper's best 0.015 for both terms; the official ACDC script uses 0.1).
        scr_weight, ifd_weight: relative weights of the two terms (paper λ1/λ2 as multiples of λ).
    """

    def __init__(self, method: Method, weight: float = 0.015, scr_weight: float = 1.0, ifd_weight: float = 1.0
                 ) -> None:
        nn.Module.__init__(self)
        net = method.net
        if method.spec.kind != TRAIN:
            raise Incompatible("SelfReg regularises training methods, not pre-training")
        if not isinstance(net, UNet) or len(net.decoder) < 1:  # hooks the U-Net's encoder and decoder blocks
            raise Incompatible("selfreg needs the U-Net (model.name=unet)")
        self.inner, self.weight, self.scr_weight, self.ifd_weight = method, weight, scr_weight, ifd_weight
        self.options, self.spec = method.options, method.spec
        self._enc: list[torch.Tensor] = []
        self._dec: list[torch.Tensor] = []
        self._capture = False
        for block in list(net.encoder)[1:]:
            block.register_forward_hook(lambda m, i, o: self._keep(self._enc, o))
        for block in net.decoder:
            block.register_forward_hook(lambda m, i, o: self._keep(self._dec, o))

    @property
    def net(self) -> nn.Module:
        return self.inner.net

    def _keep(self, store: list[torch.Tensor], out: torch.Tensor) -> None:
        if self._capture and torch.is_grad_enabled():
            store.append(out)

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        self._enc, self._dec, self._capture = [], [], True
        try:
            out = self.inner.training_step(batch, progress)
        finally:
            self._capture = False
        n_dec = len(self.net.decoder)
        enc, dec = self._enc[: len(self.net.encoder) - 1], self._dec[:n_dec]  # the first forward pass of net
        self._enc, self._dec = [], []
        if len(dec) < n_dec:
            return out  # the method did not run the U-Net forward with gradients (nothing to regularise)
        teacher = dec[-1]
        students = enc + dec[:-1]
        ifd = (torch.stack([internal_distillation(f) for f in enc]).mean()
               + torch.stack([internal_distillation(f) for f in dec[:-1] or dec]).mean())
        scr = torch.stack([semantic_consistency(f, teacher) for f in students]).mean()
        reg = self.weight * (self.ifd_weight * ifd + self.scr_weight * scr)
        logs = dict(out.logs)
        logs.update({"loss_selfreg_ifd": ifd.detach(), "loss_selfreg_scr": scr.detach()})
        return StepOutput(out.loss + reg, logs)

    def after_optimizer_step(self, progress: float) -> None:
        self.inner.after_optimizer_step(progress)
