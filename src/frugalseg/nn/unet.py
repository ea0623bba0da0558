"""One U-Net for 2-D and 3-D, with or without skip connections (PCRLv2's nsU-Net)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.nn.norm import batch_norm
from frugalseg.nn.strided import thin_safe_conv

NEGATIVE_SLOPE = 0.01  # LeakyReLU slope, as in nnU-Net


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return batch_norm(dims, channels)  # torch's, with a fast backward for narrow maps (frugalseg.nn.norm)
    return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)


class _SkipCat(torch.autograd.Function):
    """``torch.cat([a, b], 1)`` whose backward hands ``a`` a dense gradient in its own layout.

    ``a`` is an encoder feature, also used by the next encoder level, so its two gradients are added. As a channel
    slice of a channels-last gradient, the one from here has its channels apart from each other, and PyTorch's CPU add
    then works element by element for few channels: 4.0 ms per 16 × 16 × 128² bf16 add against 0.5 ms to copy the
    slice dense and 0.6 ms to add it (from 32 channels on the slice is added as fast as a dense tensor). Same values:
    only where the gradient lives changes. ``b``'s gradient stays the slice ``torch.cat`` gives."""

    @staticmethod
    def forward(ctx, a, b):  # noqa: ANN001, ANN205
        ctx.split = a.shape[1]
        return torch.cat([a, b], dim=1)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        layout = torch.channels_last if grad.dim() == 4 else torch.channels_last_3d
        ga = grad.narrow(1, 0, ctx.split).contiguous(memory_format=layout) if ctx.needs_input_grad[0] else None
        gb = grad.narrow(1, ctx.split, grad.shape[1] - ctx.split) if ctx.needs_input_grad[1] else None
        return ga, gb


def cat_skip(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], 1)``; for a CPU channels-last ``a`` of fewer than 32 channels, with a backward that gives
    ``a`` a dense gradient (:class:`_SkipCat`)."""
    layout = torch.channels_last if a.dim() == 4 else torch.channels_last_3d
    if (a.device.type == "cpu" and a.dim() in (4, 5) and 1 < a.shape[1] < 32 and a.requires_grad
            and torch.is_grad_enabled() and a.is_contiguous(memory_format=layout) and not a.is_contiguous()):
        return _SkipCat.apply(a, b)
    return torch.cat([a, b], dim=1)


class ConvBlock(nn.Sequential):
    """(conv 3 -> norm -> LeakyReLU) x 2; the first convolution may have stride 2 (downsampling)."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1, norm: str = "instance",
                 dropout: float = 0.0) -> None:
        conv = thin_safe_conv(dims)  # thin inputs in fp32 under CPU bf16 (frugalseg.nn.strided)
        layers: list[nn.Module] = [
            conv(cin, cout, 3, stride=stride, padding=1, bias=False), _norm(norm, dims, cout),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
        ]
        if dropout > 0:
            layers.append((nn.Dropout2d if dims == 2 else nn.Dropout3d)(dropout))
        layers += [conv(cout, cout, 3, padding=1, bias=False), _norm(norm, dims, cout),
                   nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)]
        super().__init__(*layers)


def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop or zero-pad the spatial dims of ``x`` (at the far end) to ``size``."""
    pads: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(tuple(size))):
        pads += [0, want - have]
    return F.pad(x, pads) if any(pads) else x


def pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad the spatial dims of ``x`` (at the far end) up to multiples of ``divisor``."""
    return match_size(x, [-(-s // divisor) * divisor for s in x.shape[2:]])


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The first ``size`` voxels of each spatial dim (undoes :func:`pad_to_multiple`)."""
    return x[(slice(None), slice(None), *(slice(0, s) for s in size))]


class UNet(nn.Module):
    """U-Net for ``spatial_dims`` 2 or 3.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (including background).
        channels: width of each level, finest first; ``len(channels)`` levels, ``len - 1`` downsamplings.
        skip: concatenate encoder features into the decoder (``False`` gives PCRLv2's nsU-Net).
        norm: ``instance`` or ``batch``.
        dropout: dropout after the first convolution of each block.

    Any input size works: stride-2 convolutions round up and the decoder crops back to each level's size.
    """

    encoder_prefixes = ("encoder.",)

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), skip: bool = True, norm: str = "instance",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims, self.skip = spatial_dims, skip
        self.channels = tuple(channels)
        self.out_channels, self.size_divisor = out_channels, 1
        self.decoder_channels = tuple(reversed(self.channels[:-1]))
        chans = self.channels
        self.encoder = nn.ModuleList(
            ConvBlock(spatial_dims, in_channels if i == 0 else chans[i - 1], c, stride=1 if i == 0 else 2,
                      norm=norm, dropout=dropout)
            for i, c in enumerate(chans)
        )
        tconv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        levels = range(len(chans) - 2, -1, -1)  # coarse to fine
        self.up = nn.ModuleList(tconv(chans[i + 1], chans[i], 2, stride=2, bias=False) for i in levels)
        self.decoder = nn.ModuleList(
            ConvBlock(spatial_dims, chans[i] * (2 if skip else 1), chans[i], norm=norm, dropout=dropout)
            for i in levels
        )
        self.head = _conv(spatial_dims)(chans[0], out_channels, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, a=NEGATIVE_SLOPE)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at every scale, finest (input resolution) first."""
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, features: list[torch.Tensor], blocks: int | None = None
               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Logits at the finest scale and the decoder features at every scale, coarsest first.

        With ``blocks`` only the first ``blocks`` decoder blocks run and the logits are ``None``.
        """
        x = features[-1]
        out = []
        for j, (up, block) in enumerate(zip(self.up, self.decoder)):
            if blocks is not None and j == blocks:
                return None, out
            target = features[-2 - j]
            x = match_size(up(x), target.shape[2:])
            if self.skip:
                x = cat_skip(target, x)
            x = block(x)
            out.append(x)
        return self.head(x), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))[0]
