"""Inference-time folding of BatchNorm into the convolution before it."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution inside an ``nn.Sequential`` into that convolution.

    In evaluation mode BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` is one convolution with
    scaled weights and a bias: the same outputs (to float rounding) without BatchNorm's pass over the feature map.
    The BatchNorm is replaced by ``nn.Identity``. For inference only: a module in training mode is refused,
    because there BatchNorm normalises with the batch's own statistics. Returns how many were folded.
    """
    if module.training:
        raise ValueError("fold_batchnorm: the module is in training mode; call .eval() first")
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if (isinstance(conv, _CONVS) and isinstance(bn, _BatchNorm) and not bn.training
                    and bn.running_mean is not None and bn.running_var is not None
                    and bn.num_features == conv.out_channels):
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
                folded += 1
    return folded
