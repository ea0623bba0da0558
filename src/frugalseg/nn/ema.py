"""Exponential moving averages of networks (BYOL target, mean-teacher) and their momentum schedules."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that takes no gradient (the EMA target starts equal to the online network)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``ξ ← m·ξ + (1 − m)·θ`` over parameters and floating-point buffers (BatchNorm running statistics).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied. Both modules must have the same structure.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(o, 1.0 - momentum)
        else:
            t.copy_(o)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule ``τ = 1 − (1 − τ_base)·(cos(π·progress) + 1)/2``: ``base`` at the start, 1 at the end."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0
