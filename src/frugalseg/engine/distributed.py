"""Data-parallel training under ``torchrun``: process group, batch shards, cross-rank statistics.

A run launched by ``torchrun --nproc_per_node P frugalseg train ...`` is one job of ``world`` processes. Every rank
builds the same global batch from ``(seed, step)`` and trains on its contiguous shard of it, so ``P`` processes with
batch ``B/P`` see exactly the samples of one process with batch ``B``. Gradients are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel`; what is not a per-sample mean is made global here:

* BatchNorm statistics over the whole batch (``SyncBatchNorm`` on GPU, :class:`DistBatchNorm` on CPU, where
  PyTorch's ``SyncBatchNorm`` does not run);
* batch Dice sums and contrastive embeddings, both with gradients (:mod:`frugalseg.collectives`, which losses and
  methods use without knowing the engine);
* EMA teachers need nothing: their students hold identical weights on every rank after each step.

Outside ``torchrun`` every helper is the identity and costs nothing.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from frugalseg.collectives import active, is_main, sum_across_ranks
from frugalseg.errors import UserError

__all__ = ["Context", "DistBatchNorm", "active", "barrier", "context", "convert_batchnorm", "is_main",
           "mean_across_ranks", "setup", "shard", "teardown"]

TIMEOUT_ENV = "FRUGALSEG_DIST_TIMEOUT"  # seconds a collective may wait for a silent rank (default 600)


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def context() -> Context:
    """This process's place in the job, read from the environment ``torchrun`` sets (single process otherwise)."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Context()
        return Context(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                       int(env.get("LOCAL_WORLD_SIZE", str(world))))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK/LOCAL_RANK/LOCAL_WORLD_SIZE are missing or not integers: "
                        "launch with `torchrun`") from None


def setup(choice: str = "auto") -> torch.device:
    """Join the job when launched by ``torchrun`` (gloo on CPU, nccl on GPU); return this rank's device.

    ``choice`` is ``--device``: ``auto`` (a CUDA GPU if there is one), ``cpu``, ``cuda`` or ``cuda:i`` (one process;
    under ``torchrun`` each rank takes the GPU of its local rank)."""
    from frugalseg.hardware import pick_device

    ctx = context()
    if ctx.world <= 1:
        return pick_device(choice)
    cuda = torch.cuda.is_available() and choice != "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        pick_device(choice)  # the one-line refusal
    device = torch.device(f"cuda:{ctx.local_rank}" if cuda else "cpu")
    if active():
        return device
    if cuda:
        torch.cuda.set_device(device)
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}: not a number of seconds") from None
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"cannot join the torchrun job ({str(exc).splitlines()[0][:160]})") from None
    return device


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's contiguous block of a global batch (every tensor is split along dimension 0)."""
    if not active():
        return batch
    w, r = dist.get_world_size(), dist.get_rank()
    out = {}
    for key, value in batch.items():
        n = value.shape[0]
        if n % w:
            raise UserError(f"batch tensor '{key}' has {n} rows, not a multiple of the {w} processes of this torchrun "
                            "job (set data.batch_size, or VoCo's method.volumes_per_step, to a multiple)")
        out[key] = value[r * (n // w):(r + 1) * (n // w)]
    return out


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar logs over ranks (one small all-reduce)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batch of every rank (the CPU counterpart of
    ``SyncBatchNorm``); the same as BatchNorm in a single process or in eval mode."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = sum_across_ranks(torch.cat([xf.sum(dims), count]))  # two passes, as BatchNorm: mean, then var
        c = x.shape[1]
        n = stats[-1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        mean = stats[:c] / n
        centred = xf - mean.view(shape)
        var = sum_across_ranks((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1.0))
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm by its cross-rank version (a no-op outside a multi-process job)."""
    if not active():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistBatchNorm):
        out = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out

