"""Local contrastive pre-training of the decoder (Chaitanya et al., NeurIPS 2020): L^R and L^D."""

from __future__ import annotations

import torch
import torch.nn as nn

from frugalseg.engine.distributed import gather_across_ranks
from frugalseg.losses.contrastive import global_contrastive_loss
from frugalseg.losses.local_contrastive import LOCAL_STRATEGIES, extract_regions, local_pair_masks, region_corners
from frugalseg.methods.base import StepOutput
from frugalseg.methods.gcl import slice_partition
from frugalseg.nn.unet import UNet


class LocalContrastive(nn.Module):
    """Contrast 3×3 regions of a decoder feature map between two intensity views; the encoder is frozen.

    The encoder comes from a ``gcl`` stage (recipe ``gcl-gd+lcl-lr``) and receives no update here; the first
    ``decoder_blocks`` decoder blocks learn. Head ``g2`` (1×1 conv + BN + ReLU, 1×1 conv) then each region's
    flattened 3×3×C features through a shared bias-free linear map to ``projection`` dims; dropped afterwards.

    Args:
        net: a U-Net with ``encode``/``decode`` and ``encoder_prefixes``.
        strategy: ``LR`` or ``LD`` (see :func:`frugalseg.losses.local_contrastive.local_pair_masks`).
        decoder_blocks: l, the decoder block whose output is contrasted (paper 3, counted from the coarsest).
        partitions: S, for ``LD`` positives across volumes (paper 4).
        temperature: τ (paper 0.1).
        projection: region embedding size (paper 128).
        region: region side in feature-map pixels (paper 3).
    """

    kind = "pretrain"
    partial_graph = True  # some trainable parameters get no gradient in a step (DDP must look for them)
    spatial_dims = (2,)

    def __init__(self, net: nn.Module, strategy: str = "LR", decoder_blocks: int = 3, partitions: int = 4,
                 temperature: float = 0.1, projection: int = 128, region: int = 3) -> None:
        super().__init__()
        if strategy not in LOCAL_STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(LOCAL_STRATEGIES)}, got {strategy!r}")
        channels = getattr(net, "channels", None)
        if not channels or not isinstance(net, UNet):  # runs only some decoder blocks: the project's U-Net
            raise ValueError("lcl needs the U-Net (model.name=unet)")
        if not 1 <= decoder_blocks <= len(channels) - 1:
            raise ValueError(f"decoder_blocks must be in 1..{len(channels) - 1}, got {decoder_blocks}")
        self.net, self.strategy, self.blocks = net, strategy, decoder_blocks
        self.temperature, self.region, self.partitions = temperature, region, partitions
        # LR: any slices; LD: same-partition slices of several volumes. Both: the views share positions.
        self.sampling = {"views": 2, "shared_spatial": True, "partitions": partitions if strategy == "LD" else 0}
        width = int(channels[len(channels) - 1 - decoder_blocks])
        conv = nn.Conv2d
        self.head = nn.Sequential(conv(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                  conv(width, width, 1, bias=False))
        self.embed = nn.Linear(width * region * region, projection, bias=False)
        prefixes = tuple(getattr(net, "encoder_prefixes", ("encoder.",)))
        self.frozen = [p for n, p in net.named_parameters() if n.startswith(prefixes)]
        for p in self.frozen:
            p.requires_grad_(False)
        self.encoder_modules = [m for n, m in net.named_children() if f"{n}." in prefixes]

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        x = torch.cat([batch["image"], batch["view2"]])
        for m in self.encoder_modules:
            m.eval()  # frozen: BatchNorm statistics stay those of the pre-trained encoder
        with torch.no_grad():
            features = self.net.encode(x)
        decoded = self.net.decode(features, self.blocks)[1][-1]  # later blocks are not run
        fmap = self.head(decoded).float()
        corners = region_corners(fmap.shape[2], fmap.shape[3], self.region)
        z = self.embed(extract_regions(fmap, corners, self.region))  # (2B, R, D)
        z1, z2 = z.chunk(2)  # under torchrun: every rank's regions, gathered with gradients
        z = torch.cat([gather_across_ranks(z1), gather_across_ranks(z2)])
        position = gather_across_ranks(batch["position"].to(z.device))
        b, r = position.shape[0], len(corners)
        dev = z.device
        image = torch.arange(b, device=dev).repeat(2).repeat_interleave(r)
        region = torch.arange(r, device=dev).repeat(2 * b)
        part = slice_partition(position, self.partitions).repeat(2).repeat_interleave(r)
        positive, negative = local_pair_masks(image, region, part, self.strategy)
        loss = global_contrastive_loss(z.reshape(2 * b * r, -1), positive, negative, self.temperature)
        return StepOutput(loss, {"loss_local": loss.detach()})
