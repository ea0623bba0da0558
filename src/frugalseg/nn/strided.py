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
views. These convolutions run on a few voxels: in fp32 they cost nothing measurable in the default U-Net's step
and ~10 % of PCRLv2's 3-D step (its thin local views); every other convolution keeps bf16.
"""

from __future__ import annotations

import torch
import torch.nn as nn

SMALL = 2  # an input this thin (or thinner) along an axis is convolved in fp32 under CPU autocast


def needs_fp32(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` could hit the faulty CPU bf16 kernels: CPU autocast is on and some spatial
    axis of the input is at most :data:`SMALL` voxels (strided or not: the faults differ between CPUs)."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and min(x.shape[2:]) <= SMALL


class _Fp32WhenThin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_fp32(x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ThinSafeConv2d(_Fp32WhenThin, nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that convolves thin inputs in fp32 under CPU autocast."""


class ThinSafeConv3d(_Fp32WhenThin, nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) that convolves thin inputs in fp32 under CPU autocast."""


def thin_safe_conv(dims: int) -> type[nn.Module]:
    return ThinSafeConv2d if dims == 2 else ThinSafeConv3d
