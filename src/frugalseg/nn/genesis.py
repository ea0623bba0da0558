"""The Models-Genesis U-Net (``UNet3D``), the layout of PCRLv2's released 3-D weights.

Parameter names follow the released checkpoints (``down_tr64.ops.0.conv1.weight``, ``down_tr64.ops.0.bn1.*``, ...)
so PCRLv2's encoder maps onto it by name. Four levels of two (conv 3 with bias -> BatchNorm -> ReLU) blocks,
max-pooling between levels; widths 1 -> 32 -> 64, 64 -> 64 -> 128, 128 -> 128 -> 256, 256 -> 256 -> 512; the decoder
upsamples with a stride-2 transposed convolution and runs two blocks on (upsampled, encoder) features.

Differences from the original, on purpose: BatchNorm uses running statistics in evaluation (the original's
``ContBatchNorm3d`` always normalises with the batch's own statistics, so a prediction depended on the other
images of its batch); the output is logits for ``out_channels`` classes (the original applies a sigmoid);
odd sizes are handled by cropping/padding the upsampled features to the encoder's size. ``skip=False`` gives
PCRLv2's nsU-Net (decoder blocks take only the upsampled features).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.nn.strided import thin_safe_conv
from frugalseg.nn.unet import match_size

WIDTHS = ((32, 64), (64, 128), (128, 256), (256, 512))  # (inner, output) width of each encoder level


class LUConv(nn.Module):
    """conv 3 (bias) -> BatchNorm -> ReLU, named as in the released weights."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = thin_safe_conv(dims)(cin, cout, 3, padding=1)  # frugalseg.nn.strided
        self.bn1 = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class _Level(nn.Module):
    def __init__(self, dims: int, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(dims, cin, mid), LUConv(dims, mid, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class _Up(nn.Module):
    def __init__(self, dims: int, cin: int, skip_channels: int, cout: int) -> None:
        super().__init__()
        self.up_conv = (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d)(cin, cin, 2, stride=2)
        self.ops = nn.Sequential(LUConv(dims, cin + skip_channels, cout), LUConv(dims, cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        x = match_size(self.up_conv(x), size)
        return self.ops(x if skip is None else torch.cat([x, skip], dim=1))


class GenesisUNet(nn.Module):
    """Models-Genesis / PCRLv2 U-Net for ``spatial_dims`` 3 (the released layout) or 2; fixed widths."""

    encoder_prefixes = ("down_tr",)

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, skip: bool = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims, self.skip = spatial_dims, skip
        self.channels = tuple(w[1] for w in WIDTHS)
        self.decoder_channels, self.out_channels, self.size_divisor = (256, 128, 64), out_channels, 1
        d = spatial_dims
        self.down_tr64 = _Level(d, in_channels, *WIDTHS[0])
        self.down_tr128 = _Level(d, 64, *WIDTHS[1])
        self.down_tr256 = _Level(d, 128, *WIDTHS[2])
        self.down_tr512 = _Level(d, 256, *WIDTHS[3])
        self.up_tr256 = _Up(d, 512, 256 if skip else 0, 256)
        self.up_tr128 = _Up(d, 256, 128 if skip else 0, 128)
        self.up_tr64 = _Up(d, 128, 64 if skip else 0, 64)
        self.out_tr = nn.Module()
        self.out_tr.final_conv = (nn.Conv2d if d == 2 else nn.Conv3d)(64, out_channels, 1)
        self._pool = nn.MaxPool2d(2) if d == 2 else nn.MaxPool3d(2)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features before each max-pooling, finest (64 channels, input resolution) first."""
        feats = [self.down_tr64(x)]
        for level in (self.down_tr128, self.down_tr256, self.down_tr512):
            feats.append(level(self._pool(feats[-1])))
        return feats

    def decode(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the decoder features at every scale, coarsest first."""
        x, out = features[-1], []
        for up, target in zip((self.up_tr256, self.up_tr128, self.up_tr64), features[-2::-1]):
            x = up(x, target if self.skip else None, target.shape[2:])
            out.append(x)
        return self.out_tr.final_conv(x), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))[0]
