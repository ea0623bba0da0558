"""PCRLv2 (Zhou et al., TPAMI 2023): multi-scale pixel restoration and multi-scale siamese feature comparison on a
U-Net without skip connections, with global and local (sub-crop) views."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.methods.base import PRETRAIN, Incompatible, Method, MethodSpec, StepOutput
from frugalseg.methods.options import OptionError, check_positive
from frugalseg.nn.genesis import GenesisUNet
from frugalseg.nn.heads import global_pool
from frugalseg.nn.unet import UNet


def siamese_cosine(pre_a: torch.Tensor, pro_a: torch.Tensor, pre_b: torch.Tensor, pro_b: torch.Tensor
                   ) -> torch.Tensor:
    """``−½[cos(pre_a, sg(pro_b)) + cos(pre_b, sg(pro_a))]``, batch mean (SimSiam's symmetric loss)."""
    return -0.5 * (F.cosine_similarity(pre_a, pro_b.detach(), dim=-1).mean()
                   + F.cosine_similarity(pre_b, pro_a.detach(), dim=-1).mean())


def restoration_weight(progress: float) -> float:
    """β = ½(1 + cos(π·progress)): the intermediate restoration fades out over training (official: over 240
    epochs)."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class PCRLv2Options:
    """Attributes:
        locals_per_sample: local views per sample (official 6).
        min_iou: the two global views' minimal IoU (official 0.3).
    """

    locals_per_sample: int = 6
    min_iou: float = 0.3

    def __post_init__(self) -> None:
        check_positive("locals_per_sample", self.locals_per_sample)
        if not 0.0 <= self.min_iou < 1.0:
            raise OptionError("min_iou", f"must be in [0, 1), got {self.min_iou}")


class PCRLv2(Method):
    """Per decoder scale ``s``: projector ``pro_s = BN(GAP(d_s))``, predictor ``pre_s`` (Linear C→2C, BN, ReLU,
    Linear 2C→C) and a restoration head (conv 3 → sigmoid, upsampled to the input size); a full-resolution
    restoration head on the last decoder features. Losses (weights 1 except β):

    * ``L_rec = MSE(restore(g1), target)`` (global view 1, un-corrupted, in [0, 1]);
    * ``L_mid = β(progress)·MSE(mask_{s*}(g1), target)``;
    * ``L_glob = siamese_cosine(g1, g2)`` at a random scale ``s*`` (shared with ``L_mid``);
    * ``L_local = mean_i ½[siamese_cosine(g1, l_i) + siamese_cosine(g2, l_i)]``, each comparison at its own random
      scale.

    Use it on the nsU-Net (``model.skip=false``, the recipe's setting). The network kept is ``net``; the heads are
    dropped.
    """

    Options = PCRLv2Options

    @classmethod
    def declare(cls, options: PCRLv2Options) -> MethodSpec:
        from frugalseg.data.pcrl_crops import SubCropSampler

        def sampler(volumes, patch_size, seed, spatial_dims=3, batch_size=4):
            return SubCropSampler(volumes, spatial_dims, patch_size, batch_size, seed,
                                  locals_per_sample=options.locals_per_sample, min_iou=options.min_iou)

        # the segmentation head of the U-Net is not trained here
        # its projectors are BatchNorm over the batch: at least 2 samples
        return MethodSpec(kind=PRETRAIN, partial_graph=True, sampler=sampler, min_batch_size=2, network_parts=True)

    def __init__(self, net: nn.Module, options: PCRLv2Options | None = None) -> None:
        super().__init__(net, options)
        if not isinstance(net, UNet | GenesisUNet):
            raise Incompatible("needs a U-Net (model.name=unet or genesis, preferably model.skip=false)")
        channels = net.channels
        dims = net.spatial_dims
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        in_ch = next(m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)).in_channels  # the image's
        scales = list(reversed(channels[:-1]))  # decoder widths, coarse to fine
        self.projectors = nn.ModuleList(nn.BatchNorm1d(c) for c in scales)
        self.predictors = nn.ModuleList(
            nn.Sequential(nn.Linear(c, 2 * c), nn.BatchNorm1d(2 * c), nn.ReLU(inplace=True), nn.Linear(2 * c, c))
            for c in scales)
        self.masks = nn.ModuleList(conv(c, in_ch, 3, padding=1) for c in scales)
        self.restore = conv(channels[0], in_ch, 1)

    def _heads(self, decoded: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pro = [bn(global_pool(d).float()) for bn, d in zip(self.projectors, decoded)]
        return pro, [p(x) for p, x in zip(self.predictors, pro)]

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        b = batch["image"].shape[0]
        # each global view in its own pass, and the locals in a third: BatchNorm (network and projectors)
        # normalises each with its own statistics, as the official code
        dec_1 = self.net.decode(self.net.encode(batch["image"]))[1]
        dec_2 = self.net.decode(self.net.encode(batch["view2"]))[1]
        (pro_1, pre_1), (pro_2, pre_2) = self._heads(dec_1), self._heads(dec_2)
        pro_g = [torch.cat(pair) for pair in zip(pro_1, pro_2)]  # view 1 then view 2 along the batch
        pre_g = [torch.cat(pair) for pair in zip(pre_1, pre_2)]
        local = batch["local"]
        n_local = local.shape[1]
        _, dec_l = self.net.decode(self.net.encode(local.flatten(0, 1)))
        pro_l, pre_l = self._heads(dec_l)
        n_scales = len(pro_g)

        def pick() -> int:
            return int(torch.randint(n_scales, (1,)).item())

        s_star = pick()
        glob = siamese_cosine(pre_g[s_star][:b], pro_g[s_star][:b], pre_g[s_star][b:], pro_g[s_star][b:])
        terms = []
        for i in range(n_local):
            for half in (slice(0, b), slice(b, 2 * b)):
                s = pick()
                pl, ql = pro_l[s].view(b, n_local, -1)[:, i], pre_l[s].view(b, n_local, -1)[:, i]
                terms.append(siamese_cosine(pre_g[s][half], pro_g[s][half], ql, pl))
        loc = torch.stack(terms).mean()
        target = batch["target"].float()
        rec = F.mse_loss(torch.sigmoid(self.restore(dec_1[-1]).float()), target)
        mask = torch.sigmoid(self.masks[s_star](dec_1[s_star]).float())
        mode = "bilinear" if mask.dim() == 4 else "trilinear"
        mask = F.interpolate(mask, size=target.shape[2:], mode=mode, align_corners=False)
        beta = restoration_weight(progress)
        mid = F.mse_loss(mask, target)
        loss = rec + beta * mid + glob + loc
        return StepOutput(loss, {"loss_rec": rec.detach(), "loss_mid": mid.detach(), "loss_global": glob.detach(),
                                 "loss_local": loc.detach(), "beta": beta})
