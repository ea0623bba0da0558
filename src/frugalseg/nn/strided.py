"""Convolutions that stay correct under CPU bf16 autocast when their input is thin.

PyTorch 2.13's CPU convolutions (oneDNN 3.12) return wrong values - non-finite or off by orders of magnitude - for
some bf16 convolutions of an input 1-2 voxels thin along its last spatial axis:
- on CPUs that run bf16 on AMX tiles (Intel Xeon, two models), the forward pass of a stride-2 convolution (a 3-D
  128 -> 256 convolution of a 2 x 3 x 2 input was wrong in 40 of 40 calls);
- on an AMD EPYC of CPU family 26 (Zen 5, AVX512-BF16, no AMX), the weight gradient of a stride-1 3-D
  convolution (256 -> 256 channels of a 2 x 3 x 2 or 2 x 2 x 2 input: 20 of 20 calls, values up to 1e36 or
  non-finite), while its forward pass and input gradient were right.
The same calls in fp32 are right (docs/results.md, "A fault in PyTorch's AMX bf16 convolutions"). A U-Net meets
such inputs at its deepest level: the default 3-D patch (32 x 48 x 32) reaches 2 x 3 x 2, as do PCRLv2's local
views; every other convolution keeps bf16.

Such a convolution has few output voxels and a large weight (256 x 256 x 27 at the default U-Net's deepest level),
a shape PyTorch's CPU fp32 convolution handles badly: ~16 ms forward + backward for the default batch in
isolation (the same call in bf16: ~4.5 ms), and ~50 ms of a 0.18 s default bf16 3-D step in place, mostly in
converting the weight and its gradient between layouts. A thin convolution on the CPU whose patch matrix is small
and wide (batch x output voxels rows, at most 1/16 of the columns - input channels x kernel voxels - and at least
2,048 columns) is computed instead as one matrix product of the input's patches with the weight
(:func:`conv_as_matmul`): ~4 ms for that call, in fp32 with or without autocast; the values are the same up to the
order of the sums (~1e-6 relative). The bounds are where the product was faster in a sweep of thin shapes on one
CPU (e.g. 22 x 256 x 2 x 3 x 2: 31 -> 16 ms; 24 x 128 x 2 x 3 x 2, a ratio of 1/12: 5.2 ms against 6.5 ms, so the
convolution; 4 x 32 x 2 x 3 x 2, 864 columns: 0.4 ms against 0.9 ms, the convolution).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL = 2  # an input this thin (or thinner) along an axis is convolved in fp32 under CPU autocast


def needs_fp32(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` could hit the faulty CPU bf16 kernels: CPU autocast is on and some spatial
    axis of the input is at most :data:`SMALL` voxels (strided or not: the faults differ between CPUs)."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and min(x.shape[2:]) <= SMALL


def conv_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: tuple[int, ...], padding: tuple[int, ...]) -> torch.Tensor:
    """A zero-padded convolution (groups 1, dilation 1) as one matrix product: the rows are the batch's output
    voxels, the columns the input patch (kernel voxels x input channels). Differentiable; the output comes in
    channels-last memory layout."""
    kernel = weight.shape[2:]
    xp = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    out = [(xp.shape[2 + i] - k) // s + 1 for i, (k, s) in enumerate(zip(kernel, stride))]
    last = xp.movedim(1, -1)  # N, *spatial, C
    patches = [last[(slice(None), *(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offset, stride, out)))]
               for offset in itertools.product(*map(range, kernel))]
    cols = torch.stack(patches, dim=-2).flatten(0, len(kernel)).flatten(1)  # rows x (kernel voxels, C)
    w = weight.movedim(1, -1).reshape(weight.shape[0], -1)  # a view for a channels-last weight
    y = cols @ w.t() if bias is None else torch.addmm(bias, cols, w.t())
    return y.view(x.shape[0], *out, -1).movedim(-1, 1)


class _Fp32WhenThin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_fp32(x):
            with torch.autocast("cpu", enabled=False):
                return self._thin(x.float())
        # an export (ONNX, TorchScript) traces PyTorch's convolution: one Conv node, not the matrix product's shapes
        if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() \
                and min(x.shape[2:]) <= SMALL:
            return self._thin(x)
        return super().forward(x)

    def _thin(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and self._small_matmul(x):
            return conv_as_matmul(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)

    def _small_matmul(self, x: torch.Tensor) -> bool:
        """Whether the convolution of ``x`` is faster as :func:`conv_as_matmul`: a zero-padded, ungrouped,
        undilated convolution whose patch matrix has at least 2,048 columns and at most 1/16 as many rows."""
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str) or \
                any(d != 1 for d in self.dilation):
            return False
        out = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[2:], self.padding, self.kernel_size, self.stride)]
        columns = self.in_channels * math.prod(self.kernel_size)
        return columns >= 2048 and 16 * x.shape[0] * math.prod(out) <= columns


class ThinSafeConv2d(_Fp32WhenThin, nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that convolves thin inputs in fp32 under CPU autocast, and
    small wide thin ones on the CPU as one matrix product."""


class ThinSafeConv3d(_Fp32WhenThin, nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) that convolves thin inputs in fp32 under CPU autocast, and
    small wide thin ones on the CPU as one matrix product."""


def thin_safe_conv(dims: int) -> type[nn.Module]:
    return ThinSafeConv2d if dims == 2 else ThinSafeConv3d
