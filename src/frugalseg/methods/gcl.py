"""Global contrastive pre-training of the encoder (Chaitanya et al., NeurIPS 2020): G^R, G^D-, G^D."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from frugalseg.collectives import gather_across_ranks
from frugalseg.losses.contrastive import GLOBAL_STRATEGIES, global_contrastive_loss, global_pair_masks
from frugalseg.methods.base import PRETRAIN, Method, MethodSpec, StepOutput, Stream
from frugalseg.methods.options import check_choice, check_positive
from frugalseg.nn.heads import encoder_width, global_pool


def slice_partition(position: torch.Tensor, partitions: int) -> torch.Tensor:
    """Partition index of each slice from its relative position ``(z + 0.5) / n`` along the slice axis."""
    return (position * partitions).floor().clamp_(0, partitions - 1).long()


@dataclass(frozen=True)
class GlobalContrastiveOptions:
    """Attributes:
        strategy: ``GR``, ``GD-`` or ``GD`` (see :func:`frugalseg.losses.contrastive.global_pair_masks`).
        partitions: S, partitions per volume along the slice axis (paper 4).
        temperature: τ (paper 0.1).
        hidden, projection: head widths (paper 1024, 128).
    """

    strategy: str = "GD"
    partitions: int = 4
    temperature: float = 0.1
    hidden: int = 1024
    projection: int = 128

    def __post_init__(self) -> None:
        check_choice("strategy", self.strategy, GLOBAL_STRATEGIES)
        for name in ("partitions", "temperature", "hidden", "projection"):
            check_positive(name, getattr(self, name))


class GlobalContrastive(Method):
    """Contrast encoder embeddings of 2-D slices; which pairs attract is set by ``strategy`` (G^R, G^D-, G^D).

    For G^D- and G^D a batch holds ``batch_size / partitions`` volumes with one slice from each of their
    ``partitions`` partitions; for G^R, random slices (the paper's SimCLR baseline). Each slice in two augmented
    views. The projection head ``g1`` (pooled encoder output -> 1024 ->
    128, ReLU, no bias, no BN) is dropped after pre-training.
    """

    Options = GlobalContrastiveOptions

    @classmethod
    def declare(cls, options: GlobalContrastiveOptions) -> MethodSpec:
        # G^R draws random slices (SimCLR); G^D- and G^D batches hold one slice of each partition of a few volumes
        parts = 0 if options.strategy == "GR" else options.partitions
        return MethodSpec(kind=PRETRAIN, spatial_dims=(2,), stream=Stream(views=2, partitions=parts),
                          partial_graph=True, network_parts=True)

    def __init__(self, net: nn.Module, options: GlobalContrastiveOptions | None = None) -> None:
        super().__init__(net, options)
        o = self.options
        width = encoder_width(net)
        self.head = nn.Sequential(nn.Linear(width, o.hidden, bias=False), nn.ReLU(inplace=True),
                                  nn.Linear(o.hidden, o.projection, bias=False))

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        x = torch.cat([batch["image"], batch["view2"]])
        z = self.head(global_pool(self.net.encode(x)[-1]).float())
        # under torchrun every rank contrasts against the whole batch (gathered with gradients)
        z1, z2 = z.chunk(2)
        z = torch.cat([gather_across_ranks(z1), gather_across_ranks(z2)])
        position = gather_across_ranks(batch["position"].to(z.device))
        b = position.shape[0]
        instance = torch.arange(b, device=z.device).repeat(2)
        partition = slice_partition(position, self.options.partitions).repeat(2)
        positive, negative = global_pair_masks(instance, partition, self.options.strategy)
        loss = global_contrastive_loss(z, positive, negative, self.options.temperature)
        return StepOutput(loss, {"loss_global": loss.detach()})
