"""Local contrastive pre-training of the decoder (Chaitanya et al., NeurIPS 2020): L^R and L^D."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from frugalseg.collectives import gather_across_ranks
from frugalseg.losses.contrastive import global_contrastive_loss
from frugalseg.losses.local_contrastive import LOCAL_STRATEGIES, extract_regions, local_pair_masks, region_corners
from frugalseg.methods.base import PRETRAIN, Incompatible, Method, MethodSpec, StepOutput, Stream
from frugalseg.methods.gcl import slice_partition
from frugalseg.methods.options import check_choice, check_positive
from frugalseg.nn.norm import BatchNorm2d
from frugalseg.nn.unet import UNet


@dataclass(frozen=True)
class LocalContrastiveOptions:
    """Attributes:
        strategy: ``LR`` or ``LD`` (see :func:`frugalseg.losses.local_contrastive.local_pair_masks`).
        decoder_blocks: l, the decoder block whose output is contrasted (paper 3, counted from the coarsest).
        partitions: S, for ``LD`` positives across volumes (paper 4).
        temperature: τ (paper 0.1).
        projection: region embedding size (paper 128).
        region: region side in feature-map pixels (paper 3).
    """

    strategy: str = "LR"
    decoder_blocks: int = 3
    partitions: int = 4
    temperature: float = 0.1
    projection: int = 128
    region: int = 3

    def __post_init__(self) -> None:
        check_choice("strategy", self.strategy, LOCAL_STRATEGIES)
        for name in ("decoder_blocks", "partitions", "temperature", "projection", "region"):
            check_positive(name, getattr(self, name))


class LocalContrastive(Method):
    """Contrast 3×3 regions of a decoder feature map between two intensity views; the encoder is frozen.

    The encoder comes from a ``gcl`` stage (recipe ``gcl-gd+lcl-lr``) and receives no update here; the first
    ``decoder_blocks`` decoder blocks learn. Head ``g2`` (1×1 conv + BN + ReLU, 1×1 conv) then each region's
    flattened 3×3×C features through a shared bias-free linear map to ``projection`` dims; dropped afterwards.
    """

    Options = LocalContrastiveOptions

    @classmethod
    def declare(cls, options: LocalContrastiveOptions) -> MethodSpec:
        # LR: any slices; LD: same-partition slices of several volumes. Both: the views share positions.
        parts = options.partitions if options.strategy == "LD" else 0
        return MethodSpec(kind=PRETRAIN, spatial_dims=(2,), partial_graph=True,
                          stream=Stream(views=2, shared_spatial=True, partitions=parts), network_parts=True)

    def __init__(self, net: nn.Module, options: LocalContrastiveOptions | None = None) -> None:
        super().__init__(net, options)
        o = self.options
        if not isinstance(net, UNet):  # runs only some decoder blocks: the project's U-Net
            raise Incompatible("needs the U-Net (model.name=unet)")
        channels = net.channels
        if not 1 <= o.decoder_blocks <= len(channels) - 1:
            raise Incompatible(f"method.decoder_blocks must be in 1..{len(channels) - 1} for model.channels "
                               f"{list(channels)}, got {o.decoder_blocks}")
        width = int(channels[len(channels) - 1 - o.decoder_blocks])
        conv = nn.Conv2d
        self.head = nn.Sequential(conv(width, width, 1, bias=False), BatchNorm2d(width), nn.ReLU(inplace=True),
                                  conv(width, width, 1, bias=False))
        self.embed = nn.Linear(width * o.region * o.region, o.projection, bias=False)
        prefixes = tuple(net.encoder_prefixes)
        self.frozen = [p for n, p in net.named_parameters() if n.startswith(prefixes)]
        for p in self.frozen:
            p.requires_grad_(False)
        self.encoder_modules = [m for n, m in net.named_children() if f"{n}." in prefixes]

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        o = self.options
        x = torch.cat([batch["image"], batch["view2"]])
        for m in self.encoder_modules:
            m.eval()  # frozen: BatchNorm statistics stay those of the pre-trained encoder
        with torch.no_grad():
            features = self.net.encode(x)
        decoded = self.net.decode(features, o.decoder_blocks)[1][-1]  # later blocks are not run
        fmap = self.head(decoded).float()
        corners = region_corners(fmap.shape[2], fmap.shape[3], o.region)
        z = self.embed(extract_regions(fmap, corners, o.region))  # (2B, R, D)
        z1, z2 = z.chunk(2)  # under torchrun: every rank's regions, gathered with gradients
        z = torch.cat([gather_across_ranks(z1), gather_across_ranks(z2)])
        position = gather_across_ranks(batch["position"].to(z.device))
        b, r = position.shape[0], len(corners)
        dev = z.device
        image = torch.arange(b, device=dev).repeat(2).repeat_interleave(r)
        region = torch.arange(r, device=dev).repeat(2 * b)
        part = slice_partition(position, o.partitions).repeat(2).repeat_interleave(r)
        positive, negative = local_pair_masks(image, region, part, o.strategy)
        loss = global_contrastive_loss(z.reshape(2 * b * r, -1), positive, negative, o.temperature)
        return StepOutput(loss, {"loss_local": loss.detach()})
