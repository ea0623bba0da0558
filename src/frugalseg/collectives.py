"""Cross-process reductions that losses and methods may use (ground floor: imports nothing of the project).

Under ``torchrun`` each rank holds a shard of the global batch; what is not a per-sample mean must be made global
here: batch Dice sums (:func:`sum_across_ranks`), contrastive embeddings (:func:`gather_across_ranks`), queue
entries of uneven length (:func:`gather_uneven`). Outside a multi-process job every helper is the identity and
costs nothing. Joining and leaving the job is :mod:`frugalseg.engine.distributed`'s business.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several of a ``torchrun`` job."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0 of the job, or the only process."""
    return not active() or dist.get_rank() == 0


class _SumAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss depends on the sum: the input's gradient collects all of them (DDP then averages)
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class _GatherAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """``Σ_ranks x``, differentiable (identity in a single process)."""
    return _SumAcrossRanks.apply(x) if active() else x


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dimension 0 in rank order = the global batch; differentiable for
    tensors that require grad (identity in a single process). All ranks must pass the same shape."""
    if not active():
        return x
    if x.requires_grad:
        return _GatherAcrossRanks.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (any length along dimension 0, same trailing shape) concatenated in rank order; no
    gradient. Identity in a single process; MONAI's ``evenly_divisible_all_gather`` under ``torchrun``."""
    if not active():
        return x
    from monai.utils import evenly_divisible_all_gather

    return evenly_divisible_all_gather(x, concat=True)
