"""BatchNorm whose training backward stays fast for narrow channels-last feature maps on AVX-512 CPUs.

PyTorch's CPU BatchNorm backward for channels-last input works through the channels of each voxel in vectors of 16
fp32 lanes on AVX-512 and handles a remainder of fewer than 16 channels element by element. With 8 or 12 channels
(the 8-128 U-Net's finest level) every voxel is such a remainder: its backward takes 12-20 ms for 16 x 8 x 128^2
against 1.7 ms in the default layout and 1.9 ms for 16 channels, in fp32 and bf16 alike; 17-31 channels pay for
their remainder too (docs/results.md, "Narrow feature maps"). :class:`BatchNorm2d`/:class:`BatchNorm3d` are
``torch.nn`` BatchNorm with the same parameters, buffers, state dict and forward (PyTorch's own); only for those
maps, in training, the backward is computed here with whole-tensor operations on the ``(voxels, channels)`` matrix
the channels-last layout already is, in fp32. Everything else (evaluation, 16 channels, 32 or more, the default
layout, other CPUs, GPUs, compiled graphs) takes PyTorch's path unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable


@functools.cache
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def narrow_channels_last(x: torch.Tensor) -> bool:
    """Whether PyTorch's BatchNorm backward would take its per-element path for ``x``: a CPU feature map of fewer
    than 32 channels, not 16, in channels-last layout (not also contiguous in the default layout), on an AVX-512
    CPU. (Measured: ours 1.0-7× faster for 2-31 channels; from 40 channels on PyTorch's is as fast or faster.)"""
    if x.device.type != "cpu" or x.dim() not in (4, 5) or x.shape[1] >= 32 or x.shape[1] % 16 == 0:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or x.is_contiguous():
        return False
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.is_contiguous(memory_format=layout) and _avx512()


class _NarrowBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm: PyTorch's forward (which also updates the running statistics), and the backward

    ``dx = w·σ⁻¹·(dy − mean(dy) − x̂·mean(dy·x̂))``, ``dw = Σ dy·x̂``, ``db = Σ dy``, ``x̂ = (x − μ)·σ⁻¹``

    over the channels-last ``(voxels, channels)`` matrix, accumulated in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):  # noqa: ANN001, ANN205
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, weight, mean, invstd = ctx.saved_tensors
        channels, dims = x.shape[1], x.dim()
        voxels = x.numel() // channels
        # rows of r voxels (r·C values), so that each per-channel vector broadcast over the rows fills whole SIMD
        # vectors (broadcast over rows of 8 values, one operation took 1-1.4 ms for 16 x 8 x 128^2, 3-5x longer)
        r = next(r for r in (8, 4, 2, 1) if voxels % r == 0)
        to_last = (0, *range(2, dims), 1)
        rows = x.permute(to_last).reshape(-1, r * channels)  # a view: x is channels-last
        centred = rows - mean.repeat(r) if rows.dtype == torch.float32 else rows.float().sub_(mean.repeat(r))
        grad = dy.permute(to_last).reshape(-1, r * channels).float()  # never written: may be dy itself
        sum_dy = grad.sum(0).view(r, channels).sum(0)
        dot = (grad * centred).sum(0).view(r, channels).sum(0)  # Σ dy·(x − μ)
        scale = invstd if weight is None else weight.float() * invstd
        dx = grad * scale.repeat(r)
        dx.addcmul_(centred, (-scale * invstd * invstd * dot / voxels).repeat(r))
        dx.add_((-scale * sum_dy / voxels).repeat(r))
        dx = dx.to(x.dtype).view(x.shape[0], *x.shape[2:], channels).permute(0, dims - 1, *range(1, dims - 1))
        grad_w = (dot * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None, None, None


class _FastNarrowBackward:
    """Mixin over ``nn.modules.batchnorm._BatchNorm``: the same forward as PyTorch's, with :class:`_NarrowBatchNorm`'s
    backward where :func:`narrow_channels_last` holds in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        # compiling is asked first: narrow_channels_last reads the CPU's capability, which a compiled graph cannot
        # trace - the break split a compiled narrow U-Net into one graph per layer and its recompilations made
        # inductor fail on the convolutions' backward (a traceback at the first step of `train.compile: true`)
        if torch.compiler.is_compiling() or not (use_batch_stats and torch.is_grad_enabled() and x.requires_grad
                                                 and narrow_channels_last(x)):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        stats = self.training and self.track_running_stats  # else the batch's statistics only, nothing updated
        return _NarrowBatchNorm.apply(x, self.weight, self.bias, self.running_mean if stats else None,
                                      self.running_var if stats else None, factor, self.eps)


class BatchNorm2d(_FastNarrowBackward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with a fast training backward for narrow channels-last maps (module docstring)."""


class BatchNorm3d(_FastNarrowBackward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` with a fast training backward for narrow channels-last maps (module docstring)."""


def batch_norm(dims: int, channels: int) -> nn.Module:
    return (BatchNorm2d if dims == 2 else BatchNorm3d)(channels)
