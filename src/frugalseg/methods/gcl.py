"""Global contrastive pre-training of the encoder (Chaitanya et al., NeurIPS 2020): G^R, G^D-, G^D."""

from __future__ import annotations

import torch
import torch.nn as nn

from frugalseg.engine.distributed import gather_across_ranks
from frugalseg.losses.contrastive import GLOBAL_STRATEGIES, global_contrastive_loss, global_pair_masks
from frugalseg.methods.base import StepOutput
from frugalseg.nn.heads import encoder_width, global_pool


def slice_partition(position: torch.Tensor, partitions: int) -> torch.Tensor:
    """Partition index of each slice from its relative position ``(z + 0.5) / n`` along the slice axis."""
    return (position * partitions).floor().clamp_(0, partitions - 1).long()


class GlobalContrastive(nn.Module):
    """Contrast encoder embeddings of 2-D slices; which pairs attract is set by ``strategy`` (G^R, G^D-, G^D).

    A batch holds ``batch_size / partitions`` volumes with one slice from each of their ``partitions``
    partitions, each slice in two augmented views. The projection head ``g1`` (pooled encoder output -> 1024 ->
    128, ReLU, no bias, no BN) is dropped after pre-training.

    Args:
        net: a network with ``encode(x) -> [features fine..coarse]``.
        strategy: ``GR``, ``GD-`` or ``GD`` (see :func:`frugalseg.losses.contrastive.global_pair_masks`).
        partitions: S, partitions per volume along the slice axis (paper 4).
        temperature: τ (paper 0.1).
        hidden, projection: head widths (paper 1024, 128).
    """

    kind = "pretrain"
    partial_graph = True  # some trainable parameters get no gradient in a step (DDP must look for them)
    spatial_dims = (2,)

    def __init__(self, net: nn.Module, strategy: str = "GD", partitions: int = 4, temperature: float = 0.1,
                 hidden: int = 1024, projection: int = 128) -> None:
        super().__init__()
        if strategy not in GLOBAL_STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(GLOBAL_STRATEGIES)}, got {strategy!r}")
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self.net, self.strategy, self.partitions, self.temperature = net, strategy, partitions, temperature
        self.sampling = {"views": 2, "partitions": partitions}
        width = encoder_width(net)
        self.head = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, projection, bias=False))

    def training_step(self, batch: dict[str, torch.Tensor], progress: float) -> StepOutput:
        x = torch.cat([batch["image"], batch["view2"]])
        z = self.head(global_pool(self.net.encode(x)[-1]).float())
        # under torchrun every rank contrasts against the whole batch (gathered with gradients)
        z1, z2 = z.chunk(2)
        z = torch.cat([gather_across_ranks(z1), gather_across_ranks(z2)])
        position = gather_across_ranks(batch["position"].to(z.device))
        b = position.shape[0]
        instance = torch.arange(b, device=z.device).repeat(2)
        partition = slice_partition(position, self.partitions).repeat(2)
        positive, negative = global_pair_masks(instance, partition, self.strategy)
        loss = global_contrastive_loss(z, positive, negative, self.temperature)
        return StepOutput(loss, {"loss_global": loss.detach()})
