"""Strided convolutions that stay correct under CPU bf16 autocast.

PyTorch 2.13's CPU convolutions (oneDNN 3.12) return wrong values - non-finite or off by more than bf16 rounding -
for a bf16 stride-2 convolution whose input has a spatial size of 1 or 2 along its last axis while another axis is
larger, on CPUs that run bf16 on AMX tiles (measured on an Intel Xeon with AMX: a 3-D 128 -> 256 convolution of a
2 x 3 x 2 input was wrong in 40 of 40 calls; the same call in fp32, or with AMX switched off, was right; see
docs/results.md, "A fault in PyTorch's AMX bf16 convolutions"). A U-Net meets such inputs in its deepest
downsampling when a patch is small (PCRLv2's local views: 16 x 24 x 16 -> 2 x 3 x 2). These convolutions run on a
few voxels, so computing them in fp32 costs nothing measurable; every other convolution keeps bf16.
"""

from __future__ import annotations

import torch
import torch.nn as nn

SMALL = 2  # an input this thin (or thinner) along an axis is convolved in fp32 under CPU autocast


def needs_fp32(x: torch.Tensor, stride) -> bool:
    """Whether a strided convolution of ``x`` would hit the faulty CPU bf16 kernels: CPU autocast is on, the
    convolution is strided and some spatial axis of the input is at most :data:`SMALL` voxels."""
    strided = any(s > 1 for s in stride) if isinstance(stride, tuple | list) else stride > 1
    return (strided and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and min(x.shape[2:]) <= SMALL)


class _Fp32WhenThin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_fp32(x, self.stride):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class StridedConv2d(_Fp32WhenThin, nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that convolves thin inputs in fp32 under CPU autocast."""


class StridedConv3d(_Fp32WhenThin, nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) that convolves thin inputs in fp32 under CPU autocast."""


def strided_conv(dims: int) -> type[nn.Module]:
    return StridedConv2d if dims == 2 else StridedConv3d
