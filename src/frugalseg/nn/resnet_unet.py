"""A 2-D U-Net on a ResNet-18 encoder, the layout of PCRLv2's released 2-D weights.

The encoder's parameter names are ResNet-18's (``encoder.conv1``, ``encoder.bn1``, ``encoder.layer1.0.conv1``, ...
``encoder.layer2.0.downsample.0``), so a released ResNet-18 encoder maps onto it by name. The decoder is the usual
ResNet U-Net decoder: five blocks (widths 256, 128, 64, 32, 16), each nearest-neighbour upsampling x2,
concatenation with the encoder feature of that size (none for the last), then two (conv 3 -> BatchNorm -> ReLU);
a 3x3 convolution gives the logits. Inputs of any size are padded to a multiple of 32 and cropped back.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.nn.strided import ThinSafeConv2d
from frugalseg.nn.unet import crop_to, pad_to_multiple

RESNET_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")  # a ResNet-18 encoder key (torchvision / smp names)

DIVISOR = 32
DECODER = (256, 128, 64, 32, 16)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ThinSafeConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = ThinSafeConv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(ThinSafeConv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Encoder(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, w, 1 if i == 1 else 2), BasicBlock(w, w)))
            cin = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]  # 1/2
        x = self.layer1(self.maxpool(x))
        feats.append(x)  # 1/4
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)  # 1/8, 1/16, 1/32
        return feats


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _cbr(cin + skip, cout)
        self.conv2 = _cbr(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class ResNet18UNet(nn.Module):
    """ResNet-18 U-Net, 2-D only."""

    encoder_prefixes = ("encoder.",)

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError("the ResNet-18 U-Net is 2-D only")
        self.spatial_dims = 2
        self.channels = (64, 64, 128, 256, 512)
        self.decoder_channels, self.out_channels, self.size_divisor = DECODER, out_channels, DIVISOR
        self.encoder = ResNet18Encoder(in_channels)
        skips = (256, 128, 64, 64, 0)
        ins = (512, *DECODER[:-1])
        self.decoder = nn.ModuleList(_DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, DECODER))
        self.head = nn.Conv2d(DECODER[-1], out_channels, 3, padding=1)

    @staticmethod
    def released_key(key: str) -> str:
        """This network's name for a key of a bare ResNet-18 checkpoint (torchvision names, e.g. PCRLv2 2-D)."""
        return "encoder." + key if RESNET_KEY.match(key) else key

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[1/2 (64), 1/4 (64), 1/8 (128), 1/16 (256), 1/32 (512)]``; the input is padded to a multiple of 32."""
        return self.encoder(pad_to_multiple(x, DIVISOR))

    def decode(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, out = features[-1], []
        skips = [*features[-2::-1], None]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
            out.append(x)
        return self.head(x), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crop_to(self.decode(self.encode(x))[0], x.shape[2:])
