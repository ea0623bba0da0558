"""MONAI SwinUNETR with the project's ``encode`` / ``decode`` contract.

Subclassing keeps MONAI's parameter names (``swinViT.*``, ``encoder1..4,10.*``, ``decoder1..5.*``, ``out.*``), so
released SwinUNETR / VoCo weights map onto it by name.
"""

from __future__ import annotations

import torch
from monai.networks.nets import SwinUNETR

from frugalseg.nn.unet import crop_to, pad_to_multiple

DIVISOR = 32  # patch_size ** 5 with MONAI's default patch size 2


class SwinUNETRNet(SwinUNETR):
    """SwinUNETR (v2 by default). Inputs of any size are padded to a multiple of 32 and cropped back."""

    encoder_prefixes = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, feature_size: int = 24,
                 use_v2: bool = True) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                         spatial_dims=spatial_dims, use_v2=use_v2)
        self.spatial_dims, self.feature_size = spatial_dims, feature_size
        self.out_channels, self.size_divisor = out_channels, DIVISOR
        self.decoder_channels = (8 * feature_size, 4 * feature_size, 2 * feature_size, feature_size, feature_size)

    @staticmethod
    def released_key(key: str) -> str:
        """This network's name for a key as released SwinUNETR / VoCo / MONAI SSL checkpoints spell it."""
        from frugalseg.nn.importers import swin_key

        return swin_key(key, "monai-ssl")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[enc0 (1), enc1 (1/2), enc2 (1/4), enc3 (1/8), hidden3 (1/16), bottleneck (1/32)]``."""
        x = pad_to_multiple(x, DIVISOR)
        hidden = self.swinViT(x, self.normalize)
        return [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]),
                hidden[3], self.encoder10(hidden[4])]

    def decode(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        enc0, enc1, enc2, enc3, hidden3, bottom = features
        dec3 = self.decoder5(bottom, hidden3)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        return self.out(out), [dec3, dec2, dec1, dec0, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crop_to(self.decode(self.encode(x))[0], x.shape[2:])
