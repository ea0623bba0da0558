"""Optimisers and learning-rate schedules (linear warm-up, then cosine / poly / constant)."""

from __future__ import annotations

import math

import torch

from frugalseg.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if cfg.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return FusedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except RuntimeError:  # a PyTorch without the fused kernel for these tensors
            pass
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same shape and the same elements at the same memory offsets (strides of
    size-1 dimensions are never used, so they may differ)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


class FusedAdamW(torch.optim.AdamW):
    """PyTorch's AdamW with ``fused=True``: each tensor updated in one pass, the same update to float rounding (the
    default U-Net's optimiser step on 2 CPU cores: 6.3 -> 3.6 ms in 2-D, 14.3 -> 7.8 ms in 3-D).

    The fused kernel walks a parameter, its gradient and its moments as flat memory, so a tensor in another layout
    than its parameter (a gradient set by hand, moments loaded from elsewhere) would be updated element by wrong
    element; such a tensor is first copied into its parameter's layout."""

    def __init__(self, params, lr: float, weight_decay: float) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not same_layout(p.grad, p):
                    p.grad = torch.empty_like(p).copy_(p.grad)
                state = self.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state and not same_layout(state[key], p):
                        state[key] = torch.empty_like(p).copy_(state[key])
        return super().step(closure)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "poly":
        return (1 - t) ** cfg.poly_power
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg))
